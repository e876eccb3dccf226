//! The tap's parser: [`Framer`] reads backend message headers as the bytes
//! stream past and hands the control messages to the [`WireState`].

use super::*;

/// Control messages longer than this are not copied (an `ErrorResponse` or a
/// `ParameterStatus` is a few hundred bytes).
pub(super) const CAPTURE_LIMIT: usize = 16 * 1024;

/// Frames backend messages from arbitrary chunks of the byte stream.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    pub(super) header: [u8; 5],
    pub(super) have: usize,
    pub(super) remaining: usize,
    pub(super) kind: u8,
    pub(super) body: Vec<u8>,
    pub(super) capture: bool,
    /// The client sent SSLRequest: the server's next byte is a bare 'S' or 'N'.
    pub(super) expect_ssl_byte: bool,
    /// The first bytes the client wrote, to recognise SSLRequest.
    pub(super) written: [u8; 8],
    pub(super) written_len: usize,
    pub(super) broken: bool,
    /// Frontend framing: untyped messages still expected (SSLRequest, startup).
    pub(super) out_untyped_seen: bool,
    pub(super) out_header: [u8; 5],
    pub(super) out_have: usize,
    pub(super) out_remaining: usize,
    pub(super) out_broken: bool,
}

pub(super) const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl Framer {
    pub(crate) fn on_write(&mut self, bytes: &[u8], wire: &WireState) {
        if self.written_len < 8 {
            let n = (8 - self.written_len).min(bytes.len());
            self.written[self.written_len..self.written_len + n].copy_from_slice(&bytes[..n]);
            self.written_len += n;
            if self.written_len == 8 && self.written == SSL_REQUEST {
                self.expect_ssl_byte = true;
            }
        }
        self.frame_out(bytes, wire);
    }

    /// Frames frontend messages to count those that each end in one
    /// `ReadyForQuery`: `Q` (simple query) and `S` (Sync). The first message on a
    /// stream has no type byte (SSLRequest or the startup message; after an
    /// SSLRequest answered with `N`, the startup message follows, untyped too).
    pub(super) fn frame_out(&mut self, mut bytes: &[u8], wire: &WireState) {
        while !bytes.is_empty() && !self.out_broken {
            if self.out_remaining == 0 {
                let typed = self.out_untyped_seen;
                let need = if typed { 5 } else { 4 };
                let n = (need - self.out_have).min(bytes.len());
                self.out_header[self.out_have..self.out_have + n].copy_from_slice(&bytes[..n]);
                self.out_have += n;
                bytes = &bytes[n..];
                if self.out_have < need {
                    return;
                }
                let (kind, len_at) = if typed {
                    (self.out_header[0], 1)
                } else {
                    (0, 0)
                };
                let len = i32::from_be_bytes([
                    self.out_header[len_at],
                    self.out_header[len_at + 1],
                    self.out_header[len_at + 2],
                    self.out_header[len_at + 3],
                ]);
                if len < 4 {
                    self.out_broken = true;
                    wire.desync();
                    return;
                }
                self.out_have = 0;
                self.out_remaining = len as usize - 4;
                if typed {
                    if kind == b'Q' || kind == b'S' {
                        wire.syncs_sent.fetch_add(1, Ordering::Release);
                    }
                } else if len == 8 && self.written == SSL_REQUEST {
                    // SSLRequest: the startup message (untyped) comes next, on this
                    // stream ('N') or above TLS ('S', where a new tap takes over).
                } else {
                    self.out_untyped_seen = true;
                    // The startup exchange ends in one ReadyForQuery.
                    wire.syncs_sent.fetch_add(1, Ordering::Release);
                }
                continue;
            }
            let n = self.out_remaining.min(bytes.len());
            self.out_remaining -= n;
            bytes = &bytes[n..];
        }
    }

    pub(crate) fn on_read(&mut self, mut bytes: &[u8], wire: &WireState) {
        while !bytes.is_empty() && !self.broken {
            if self.expect_ssl_byte {
                // 'S': TLS follows (this tap is switched off); 'N': plaintext goes on.
                self.expect_ssl_byte = false;
                bytes = &bytes[1..];
                continue;
            }
            if self.remaining == 0 && self.have < 5 {
                let n = (5 - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have < 5 {
                    return;
                }
                self.kind = self.header[0];
                let len = i32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if len < 4 {
                    self.broken = true;
                    wire.desync();
                    return;
                }
                self.remaining = len as usize - 4;
                // Rows and command tags are copied only while a capture is armed.
                self.capture = self.remaining <= CAPTURE_LIMIT
                    && (matches!(self.kind, b'E' | b'S' | b'Z' | b'R')
                        || (matches!(self.kind, b'C' | b'D') && wire.capturing()));
                self.body.clear();
                if self.remaining == 0 {
                    self.finish(wire);
                }
                continue;
            }
            let n = self.remaining.min(bytes.len());
            if self.capture {
                self.body.extend_from_slice(&bytes[..n]);
            }
            self.remaining -= n;
            bytes = &bytes[n..];
            if self.remaining == 0 {
                self.finish(wire);
            }
        }
    }

    pub(super) fn finish(&mut self, wire: &WireState) {
        if self.capture && matches!(self.kind, b'C' | b'D') {
            wire.on_captured(self.kind, &self.body);
        }
        wire.on_message(self.kind, if self.capture { &self.body } else { &[] });
        self.have = 0;
        self.remaining = 0;
    }
}
