//! The TLS stream tokio-postgres reads and writes, over tokio-rustls, and its
//! `tls-server-end-point` channel binding (RFC 5929 §4.1): the hash of the
//! server's certificate, with the hash function of the certificate's own
//! signature (SHA-256 for MD5 and SHA-1). SCRAM-SHA-256-PLUS binds the
//! password exchange to it, so a man in the middle holding another
//! certificate cannot relay the login.
//!
//! Ours rather than a crate's: the one other crate that does this pulls an
//! X.509 parser (a dozen crates) to read one OID, and reads it from the wrong
//! structure. The certificate's outer layout is fixed by RFC 5280 §4.1:
//! `SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, … }, … }`;
//! reading three DER headers finds the OID.

use std::pin::Pin;
use std::task::{Context, Poll};

use ring::digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::ChannelBinding;

/// A client TLS stream with its channel binding.
#[derive(Debug)]
pub(crate) struct RustlsStream<S>(pub(crate) tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| server_end_point(cert.as_ref()))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The `tls-server-end-point` data for a DER certificate, or `None` when its
/// signature algorithm names no single hash (Ed25519, RSASSA-PSS): the server
/// cannot compute one either, and offers no channel binding then.
pub(crate) fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    let algorithm = hash_of(signature_oid(cert)?)?;
    Some(digest::digest(algorithm, cert).as_ref().to_vec())
}

/// The DER value of the certificate's `signatureAlgorithm` OID.
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    let (tag, certificate, _) = der(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, _tbs, rest) = der(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, algorithm, _) = der(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der(algorithm)?;
    (tag == 0x06).then_some(oid)
}

/// One DER element at the start of `input`: its tag, its contents and what
/// follows it. Definite lengths only (DER has no other), up to 4 length bytes.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

/// The hash RFC 5929 asks for, given a signature algorithm's OID.
fn hash_of(oid: &[u8]) -> Option<&'static digest::Algorithm> {
    // 1.2.840.113549.1.1.{4,5,11,12,13}: RSA with MD5, SHA-1, SHA-256/384/512.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    // 1.2.840.10045.4.1 (SHA-1) and 1.2.840.10045.4.3.{2,3,4}: ECDSA.
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    if oid == ECDSA_SHA1 {
        return Some(&digest::SHA256);
    }
    let (prefix, last) = oid.split_at(oid.len().checked_sub(1)?);
    match (prefix, last[0]) {
        (RSA, 4 | 5 | 11) | (ECDSA, 2) => Some(&digest::SHA256),
        (RSA, 12) | (ECDSA, 3) => Some(&digest::SHA384),
        (RSA, 13) | (ECDSA, 4) => Some(&digest::SHA512),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_end_point_hash_follows_the_signature_algorithm() {
        for (alg, len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, 32),
            (&rcgen::PKCS_ECDSA_P384_SHA384, 48),
        ] {
            let der = cert(alg);
            let hash = server_end_point(&der).expect("a hash");
            assert_eq!(hash.len(), len);
            let algorithm = if len == 32 {
                &digest::SHA256
            } else {
                &digest::SHA384
            };
            assert_eq!(hash, digest::digest(algorithm, &der).as_ref());
        }
        // Ed25519 names no hash: no binding, as on the server.
        assert_eq!(server_end_point(&cert(&rcgen::PKCS_ED25519)), None);
    }

    #[test]
    fn rsa_oids_map_as_rfc_5929_says() {
        let rsa = |n: u8| [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, n];
        assert!(std::ptr::eq(hash_of(&rsa(5)).unwrap(), &digest::SHA256));
        assert!(std::ptr::eq(hash_of(&rsa(11)).unwrap(), &digest::SHA256));
        assert!(std::ptr::eq(hash_of(&rsa(12)).unwrap(), &digest::SHA384));
        assert!(std::ptr::eq(hash_of(&rsa(13)).unwrap(), &digest::SHA512));
        // RSASSA-PSS carries its hash in parameters; PostgreSQL offers no binding.
        assert_eq!(hash_of(&rsa(10)).map(|_| ()), None);
        assert_eq!(hash_of(&[]).map(|_| ()), None);
    }

    proptest::proptest! {
        #[test]
        fn garbage_is_never_a_certificate_and_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = server_end_point(&bytes);
        }

        #[test]
        fn a_cut_certificate_gives_no_hash(cut in 0usize..200) {
            let der = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
            let cut = cut.min(der.len() - 1);
            // The OID sits after the whole TBS: any cut before it loses it.
            let short = &der[..cut];
            proptest::prop_assert_eq!(server_end_point(short), None);
        }
    }
}
