//! Prepared statements that survive a transaction-mode pooler.
//!
//! Behind PgBouncer in transaction mode, each round trip outside a
//! transaction may reach a different server backend. tokio-postgres (under
//! diesel-async) prepares a *named* statement in one round trip (`Parse` +
//! `Describe` + `Sync`) and uses it in the next (`Bind` + `Execute` +
//! `Sync`): the second round trip can land on a backend that never saw the
//! statement (`prepared statement "s3" does not exist`), and the first leaves
//! the statement behind on a backend another client later gets (`"s0"
//! already exists`). Neither library can be told to do otherwise.
//!
//! The seam is the wire, where the protocol tap already sits. This state
//! machine rewrites the frontend stream so that no named statement ever
//! reaches the server:
//!
//! - `Parse` of a named statement is remembered (name → query and parameter
//!   types) and sent as a `Parse` of the unnamed statement, so `Describe`
//!   still returns the parameter and row types tokio-postgres asks for;
//! - `Bind` (and `Describe`) of a named statement is preceded, in the same
//!   round trip, by a `Parse` of the unnamed statement with the remembered
//!   query, and names the unnamed statement instead. The server's reply to
//!   that injected `Parse` (`ParseComplete`) is removed from the backend
//!   stream, so tokio-postgres sees exactly the replies it expects;
//! - `Close` of a named statement forgets it and closes the unnamed one
//!   (harmless, and it keeps the reply the same).
//!
//! Each use is therefore parsed and executed within one round trip, which
//! costs a parse per execution (the price is measured in the benches), and
//! nothing outlives the round trip on the server. Replies are matched to
//! injected messages by order: the server answers messages in order and, after
//! an `ErrorResponse`, skips to the next `Sync`, so a queue of outstanding
//! `Parse`s tagged with their round trip is enough.

use std::collections::{HashMap, VecDeque};

/// The most statements one connection may have prepared at once. diesel-async
/// caches one per distinct query shape and closes the others after use, so a
/// real application stays far below; past it the connection fails (and is
/// replaced by the pool) rather than growing without bound.
pub(crate) const MAX_STATEMENTS: usize = 10_000;

/// The SSLRequest code: the backend answers it with one untyped byte.
const SSL_REQUEST: u32 = 80_877_103;

/// What one `Parse` sent to the server will be answered by.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The round trip (count of `Sync`s and simple queries sent before it).
    round: u64,
    /// Injected by us: its `ParseComplete` is not tokio-postgres's.
    injected: bool,
}

/// The rewriting state of one connection (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct Unnamer {
    // ---- frontend
    /// Bytes of the frontend message being gathered (header included).
    f_msg: Vec<u8>,
    /// Bytes of a pass-through frontend message still to copy.
    f_copy: usize,
    /// The startup exchange is over: frontend messages carry a type byte.
    f_typed: bool,
    /// Named statements: name → the rest of their `Parse` (query, types).
    statements: HashMap<Vec<u8>, Vec<u8>>,
    /// The named statement the unnamed one holds in this round trip.
    holds: Option<Vec<u8>>,
    /// Round trips sent.
    rounds_sent: u64,
    /// `Parse`s sent and not yet answered, oldest first.
    parses: VecDeque<Pending>,
    // ---- backend
    b_head: [u8; 5],
    b_have: usize,
    /// Bytes of the current backend message's body still to pass.
    b_copy: usize,
    /// One untyped byte (the answer to an SSLRequest) comes next.
    b_ssl_byte: bool,
    /// The startup's `ReadyForQuery` was seen.
    b_started: bool,
    /// Round trips answered.
    rounds_done: u64,
    /// The stream could not be framed: pass everything through.
    broken: bool,
}

/// Why a connection cannot go on through the rewriter.
#[derive(Debug)]
pub(crate) struct Overflow;

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "more than {MAX_STATEMENTS} prepared statements on one connection behind a transaction-mode pooler"
        )
    }
}

fn cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

fn push_msg(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    out.push(kind);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

impl Unnamer {
    /// Rewrites frontend bytes (any split) into `out`.
    pub(crate) fn write(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> Result<(), Overflow> {
        while !bytes.is_empty() {
            if self.broken {
                out.extend_from_slice(bytes);
                return Ok(());
            }
            if self.f_copy > 0 {
                let n = self.f_copy.min(bytes.len());
                out.extend_from_slice(&bytes[..n]);
                self.f_copy -= n;
                bytes = &bytes[n..];
                continue;
            }
            let head = if self.f_typed { 5 } else { 4 };
            if self.f_msg.len() < head {
                let n = (head - self.f_msg.len()).min(bytes.len());
                self.f_msg.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.f_msg.len() < head {
                    return Ok(());
                }
            }
            let at = head - 4;
            let len = u32::from_be_bytes(self.f_msg[at..at + 4].try_into().expect("4 bytes"));
            if len < 4 {
                self.broken = true;
                out.append(&mut self.f_msg);
                continue;
            }
            let total = at + len as usize;
            let kind = if self.f_typed { self.f_msg[0] } else { 0 };
            if self.f_typed && !matches!(kind, b'P' | b'B' | b'D' | b'C') {
                // Not about statements: stream it through.
                if matches!(kind, b'S' | b'Q' | b'F') {
                    self.rounds_sent += 1;
                    self.holds = None;
                }
                out.append(&mut self.f_msg);
                self.f_copy = total - head;
                continue;
            }
            let n = (total - self.f_msg.len()).min(bytes.len());
            self.f_msg.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.f_msg.len() < total {
                return Ok(());
            }
            let msg = std::mem::take(&mut self.f_msg);
            if self.f_typed {
                self.rewrite(kind, &msg, out)?;
            } else {
                // SSLRequest (answered by one byte, then the startup follows
                // untyped), or the startup message.
                let code = msg
                    .get(4..8)
                    .map(|c| u32::from_be_bytes(c.try_into().expect("4")));
                if msg.len() == 8 && code == Some(SSL_REQUEST) {
                    self.b_ssl_byte = true;
                } else {
                    self.f_typed = true;
                }
                out.extend_from_slice(&msg);
            }
        }
        Ok(())
    }

    /// Sends `Parse` of the unnamed statement as `name`'s, in this round trip.
    fn inject_parse(&mut self, name: &[u8], out: &mut Vec<u8>) -> bool {
        if self.holds.as_deref() == Some(name) {
            return true;
        }
        let Some(tail) = self.statements.get(name) else {
            return false;
        };
        push_msg(out, b'P', &[b"\0", tail]);
        self.parses.push_back(Pending {
            round: self.rounds_sent,
            injected: true,
        });
        self.holds = Some(name.to_vec());
        true
    }

    fn rewrite(&mut self, kind: u8, msg: &[u8], out: &mut Vec<u8>) -> Result<(), Overflow> {
        let body = &msg[5..];
        match kind {
            b'P' => {
                let Some((name, tail)) = cstr(body) else {
                    out.extend_from_slice(msg);
                    return Ok(());
                };
                self.parses.push_back(Pending {
                    round: self.rounds_sent,
                    injected: false,
                });
                if name.is_empty() {
                    self.holds = None;
                    out.extend_from_slice(msg);
                    return Ok(());
                }
                if !self.statements.contains_key(name) && self.statements.len() >= MAX_STATEMENTS {
                    return Err(Overflow);
                }
                self.statements.insert(name.to_vec(), tail.to_vec());
                push_msg(out, b'P', &[b"\0", tail]);
                self.holds = Some(name.to_vec());
            }
            b'B' => {
                let parsed = cstr(body).and_then(|(portal, rest)| {
                    cstr(rest).map(|(statement, rest)| (portal, statement, rest))
                });
                match parsed {
                    Some((portal, statement, rest))
                        if !statement.is_empty() && self.inject_parse(statement, out) =>
                    {
                        push_msg(out, b'B', &[portal, b"\0", b"\0", rest]);
                    }
                    _ => out.extend_from_slice(msg),
                }
            }
            b'D' => match (body.first(), cstr(body.get(1..).unwrap_or_default())) {
                (Some(b'S'), Some((name, _)))
                    if !name.is_empty() && self.inject_parse(name, out) =>
                {
                    push_msg(out, b'D', &[b"S\0"]);
                }
                _ => out.extend_from_slice(msg),
            },
            b'C' => match (body.first(), cstr(body.get(1..).unwrap_or_default())) {
                (Some(b'S'), Some((name, _)))
                    if !name.is_empty() && self.statements.remove(name).is_some() =>
                {
                    self.holds = None;
                    push_msg(out, b'C', &[b"S\0"]);
                }
                _ => out.extend_from_slice(msg),
            },
            _ => out.extend_from_slice(msg),
        }
        Ok(())
    }

    /// Filters backend bytes (any split) into `out`: drops the replies to
    /// injected `Parse`s.
    pub(crate) fn read(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) {
        while !bytes.is_empty() {
            if self.broken {
                out.extend_from_slice(bytes);
                return;
            }
            if self.b_ssl_byte {
                self.b_ssl_byte = false;
                out.push(bytes[0]);
                bytes = &bytes[1..];
                continue;
            }
            if self.b_copy > 0 {
                let n = self.b_copy.min(bytes.len());
                out.extend_from_slice(&bytes[..n]);
                self.b_copy -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.b_have).min(bytes.len());
            self.b_head[self.b_have..self.b_have + n].copy_from_slice(&bytes[..n]);
            self.b_have += n;
            bytes = &bytes[n..];
            if self.b_have < 5 {
                return;
            }
            self.b_have = 0;
            let kind = self.b_head[0];
            let len = u32::from_be_bytes(self.b_head[1..5].try_into().expect("4 bytes"));
            if len < 4 {
                self.broken = true;
                out.extend_from_slice(&self.b_head);
                continue;
            }
            self.b_copy = len as usize - 4;
            let ours = kind == b'1'
                && self.b_started
                && self.parses.pop_front().is_some_and(|p| p.injected)
                && len == 4;
            if ours {
                continue; // the reply to our own Parse
            }
            match kind {
                b'E' if self.b_started => self.drop_round(),
                b'Z' if self.b_started => {
                    self.drop_round();
                    self.rounds_done += 1;
                }
                b'Z' => self.b_started = true,
                _ => {}
            }
            out.extend_from_slice(&self.b_head);
        }
    }

    /// The current round trip failed or ended: its unanswered `Parse`s will
    /// never be answered.
    fn drop_round(&mut self) {
        while self
            .parses
            .front()
            .is_some_and(|p| p.round == self.rounds_done)
        {
            self.parses.pop_front();
        }
    }

    /// Named statements remembered.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.statements.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        push_msg(&mut v, kind, &[body]);
        v
    }

    fn started() -> Unnamer {
        let mut u = Unnamer::default();
        let mut out = Vec::new();
        // Startup message (untyped), then the backend's startup replies.
        let mut startup = 9u32.to_be_bytes().to_vec();
        startup.extend_from_slice(&[0, 3, 0, 0, 0]);
        u.write(&startup, &mut out).unwrap();
        assert_eq!(out, startup);
        let mut back = Vec::new();
        u.read(
            &[msg(b'R', &[0, 0, 0, 0]), msg(b'Z', b"I")].concat(),
            &mut back,
        );
        u
    }

    fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
            v.push((bytes[0], bytes[5..1 + len].to_vec()));
            bytes = &bytes[1 + len..];
        }
        v
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(
            b'P',
            &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0", &[0, 0]].concat(),
        )
    }

    fn bind(statement: &str) -> Vec<u8> {
        msg(
            b'B',
            &[
                b"\0",
                statement.as_bytes(),
                b"\0",
                &[0, 0, 0, 0, 0, 1, 0, 1],
            ]
            .concat(),
        )
    }

    #[test]
    fn a_prepare_then_an_execute_become_unnamed_and_self_contained() {
        let mut u = started();
        // Round trip 1: prepare.
        let mut out = Vec::new();
        let prepare = [parse("s0", "SELECT 1"), msg(b'D', b"Ss0\0"), msg(b'S', b"")].concat();
        u.write(&prepare, &mut out).unwrap();
        let f = frames(&out);
        assert_eq!(f[0], (b'P', b"\0SELECT 1\0\0\0".to_vec()));
        assert_eq!(f[1], (b'D', b"S\0".to_vec()));
        assert_eq!(f[2].0, b'S');
        let mut back = Vec::new();
        let replies = [
            msg(b'1', b""),
            msg(b't', &[0, 0]),
            msg(b'n', b""),
            msg(b'Z', b"I"),
        ]
        .concat();
        u.read(&replies, &mut back);
        assert_eq!(back, replies, "the prepare's replies pass untouched");

        // Round trip 2: execute; the Parse is injected and its reply removed.
        let mut out = Vec::new();
        let execute = [bind("s0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        u.write(&execute, &mut out).unwrap();
        let f = frames(&out);
        assert_eq!(f[0], (b'P', b"\0SELECT 1\0\0\0".to_vec()));
        assert_eq!(f[1].0, b'B');
        assert!(f[1].1.starts_with(b"\0\0"), "binds the unnamed statement");
        assert_eq!(f[2].0, b'E');
        let mut back = Vec::new();
        let rows = [
            msg(b'2', b""),
            msg(b'D', &[0, 1, 0, 0, 0, 1, b'1']),
            msg(b'C', b"SELECT 1\0"),
        ]
        .concat();
        let replies = [msg(b'1', b""), rows.clone(), msg(b'Z', b"I")].concat();
        // Any split of the reply stream gives the same result.
        for cut in 0..replies.len() {
            let mut uu = Unnamer {
                parses: u.parses.clone(),
                ..Default::default()
            };
            uu.b_started = true;
            uu.rounds_done = u.rounds_done;
            let mut b = Vec::new();
            uu.read(&replies[..cut], &mut b);
            uu.read(&replies[cut..], &mut b);
            assert_eq!(b, [rows.clone(), msg(b'Z', b"I")].concat(), "cut at {cut}");
        }
        u.read(&replies, &mut back);
        assert_eq!(back, [rows, msg(b'Z', b"I")].concat());
        assert!(u.parses.is_empty());

        // Close forgets the statement.
        let mut out = Vec::new();
        u.write(&[msg(b'C', b"Ss0\0"), msg(b'S', b"")].concat(), &mut out)
            .unwrap();
        assert_eq!(frames(&out)[0], (b'C', b"S\0".to_vec()));
        assert_eq!(u.remembered(), 0);
    }

    #[test]
    fn frontend_bytes_split_anywhere_rewrite_the_same() {
        let stream = [
            parse("s7", "SELECT $1"),
            msg(b'D', b"Ss7\0"),
            msg(b'S', b""),
            bind("s7"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
        ]
        .concat();
        let mut whole = Vec::new();
        started().write(&stream, &mut whole).unwrap();
        for cut in 0..stream.len() {
            let mut u = started();
            let mut out = Vec::new();
            u.write(&stream[..cut], &mut out).unwrap();
            u.write(&stream[cut..], &mut out).unwrap();
            assert_eq!(out, whole, "cut at {cut}");
        }
    }

    #[test]
    fn an_error_ends_the_round_and_its_unanswered_parses() {
        let mut u = started();
        let mut out = Vec::new();
        u.write(
            &[parse("s1", "SELECT nope"), msg(b'S', b"")].concat(),
            &mut out,
        )
        .unwrap();
        // The server refuses the Parse: no ParseComplete, an error, then ready.
        let mut back = Vec::new();
        u.read(
            &[msg(b'E', b"SERROR\0\0"), msg(b'Z', b"I")].concat(),
            &mut back,
        );
        assert!(u.parses.is_empty());
        // A later injected Parse is still recognised.
        u.write(
            &[bind("s1"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat(),
            &mut out,
        )
        .unwrap();
        let mut back = Vec::new();
        u.read(
            &[msg(b'1', b""), msg(b'2', b""), msg(b'Z', b"I")].concat(),
            &mut back,
        );
        assert_eq!(
            frames(&back).iter().map(|f| f.0).collect::<Vec<_>>(),
            vec![b'2', b'Z']
        );
    }

    #[test]
    fn unnamed_and_unknown_statements_pass_untouched() {
        let mut u = started();
        let mut out = Vec::new();
        let stream = [
            parse("", "SELECT 2"),
            bind("unknown"),
            msg(b'Q', b"SELECT 3\0"),
        ]
        .concat();
        u.write(&stream, &mut out).unwrap();
        assert_eq!(out, stream);
    }

    #[test]
    fn an_ssl_request_answered_n_is_followed_by_an_untyped_startup() {
        let mut u = Unnamer::default();
        let mut out = Vec::new();
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        u.write(&ssl, &mut out).unwrap();
        let mut back = Vec::new();
        u.read(b"N", &mut back);
        assert_eq!(back, b"N");
        let mut startup = 9u32.to_be_bytes().to_vec();
        startup.extend_from_slice(&[0, 3, 0, 0, 0]);
        u.write(&startup, &mut out).unwrap();
        assert!(u.f_typed);
    }

    #[test]
    fn the_statement_map_is_bounded() {
        let mut u = started();
        let mut out = Vec::new();
        for i in 0..MAX_STATEMENTS {
            u.write(&parse(&format!("s{i}"), "SELECT 1"), &mut out)
                .unwrap();
            out.clear();
        }
        assert!(u.write(&parse("one-more", "SELECT 1"), &mut out).is_err());
        // Re-preparing a known name is not growth.
        assert!(u.write(&parse("s0", "SELECT 1"), &mut out).is_ok());
    }
}
