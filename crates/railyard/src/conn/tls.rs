//! rustls client configuration from `sslmode` and `sslrootcert`, with libpq's
//! meanings (see [`SslMode`]). No OpenSSL anywhere.
//!
//! The connector returned here is the seam for the protocol tap :
//! when it upgrades a socket, the socket's tap is switched off and the decrypted
//! stream above TLS is tapped instead, sharing the connection's one wire state.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

pub(crate) use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::TlsConnect;

use super::endpoint::RustlsStream;

use super::wire::{Tapped, WireState};
use crate::config::{MAX_ROOT_CERT_LEN, SslMode, read_small_file};
use crate::error::Error;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for a mode and an optional CA file.
///
/// Returns `None` for [`SslMode::Disable`], without reading the CA file. Errors
/// name the file and what is wrong with it. Reading the file blocks: on an
/// async path, call this on the blocking pool.
pub(crate) fn tls_client_config(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<Option<Arc<ClientConfig>>, Error> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::tls("protocol versions", e))?;
    let roots = match root_cert {
        Some(path) => Some(Arc::new(load_roots(path)?)),
        None => None,
    };
    let web_roots = || {
        Arc::new(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::Disable, _) => return Ok(None),
        // libpq: prefer/require do not verify, unless a root certificate is given for
        // require, which then behaves as verify-ca.
        (SslMode::Prefer, _) | (SslMode::Require, None) => Arc::new(NoVerification {
            algorithms: provider.signature_verification_algorithms,
        }),
        (SslMode::Require, Some(roots)) | (SslMode::VerifyCa, Some(roots)) => {
            Arc::new(ChainOnly(webpki_verifier(roots, &provider)?))
        }
        (SslMode::VerifyCa, None) => Arc::new(ChainOnly(webpki_verifier(web_roots(), &provider)?)),
        (SslMode::VerifyFull, Some(roots)) => webpki_verifier(roots, &provider)?,
        (SslMode::VerifyFull, None) => webpki_verifier(web_roots(), &provider)?,
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

fn webpki_verifier(
    roots: Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, Error> {
    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::tls("certificate verifier", e))
}

fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    // A regular file of bounded size: a FIFO or a device would block or never end.
    let bytes = read_small_file(path, "sslrootcert", MAX_ROOT_CERT_LEN).map_err(|e| {
        Error::Tls {
            message: format!(
                "{}; point sslrootcert at the CA certificate (PEM) that signed the server's certificate",
                e.message
            ),
            source: e.source,
        }
    })?;
    let mut store = RootCertStore::empty();
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| {
            Error::tls(
                format!("sslrootcert {} is not valid PEM: {e}", path.display()),
                e,
            )
        })?;
        store.add(cert).map_err(|e| {
            Error::tls(
                format!(
                    "sslrootcert {} holds an unusable certificate: {e}",
                    path.display()
                ),
                e,
            )
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::Tls {
            message: format!("sslrootcert {} holds no PEM certificate", path.display()),
            source: None,
        });
    }
    Ok(store)
}

/// verify-ca: the chain must be valid, the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer / require without a CA: encrypt, but accept any certificate (as libpq).
/// Handshake signatures are still checked, so the peer holds the certificate's key.
#[derive(Debug)]
struct NoVerification {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Our `TlsConnect`: rustls through tokio-rustls (see `super::endpoint`),
/// with the protocol tap moved from the socket to the decrypted stream when
/// TLS is negotiated.
pub(crate) struct Connector {
    inner: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    pub(crate) wire: Arc<WireState>,
    unnamed: bool,
}

impl Connector {
    /// `config` is `None` for `sslmode=disable`: the connector is then never asked
    /// to upgrade (tokio-postgres does not call it).
    pub(crate) fn new(
        config: Option<&Arc<ClientConfig>>,
        host: &str,
        wire: Arc<WireState>,
    ) -> Result<Self, Error> {
        let inner = match config {
            None => None,
            Some(cfg) => {
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| Error::tls(format!("server name {host:?}"), e))?;
                Some((tokio_rustls::TlsConnector::from(cfg.clone()), name))
            }
        };
        Ok(Connector {
            inner,
            wire,
            unnamed: false,
        })
    }

    /// Rewrites named statements above TLS (see `super::unnamed`).
    pub(crate) fn unnamed(mut self, on: bool) -> Self {
        self.unnamed = on;
        self
    }
}

impl<S> TlsConnect<Tapped<S>> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Tapped<RustlsStream<Tapped<S>>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Stream>> + Send>>;

    fn connect(self, mut stream: Tapped<S>) -> Self::Future {
        // Below TLS the bytes are ciphertext: observe above it instead (D2).
        stream.set_observing(false);
        let wire = self.wire.clone();
        let inner = self.inner;
        let unnamed = self.unnamed;
        Box::pin(async move {
            let Some((connector, name)) = inner else {
                wire.note_tls_failure();
                return Err(std::io::Error::other(
                    "TLS was requested but sslmode=disable built no TLS configuration",
                ));
            };
            match connector.connect(name, stream).await {
                Ok(tls) => {
                    wire.note_tls();
                    Ok(Tapped::new(RustlsStream(tls), wire, true).unnamed(unnamed))
                }
                Err(e) => {
                    wire.note_tls_failure();
                    Err(e)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_disable_reads_no_root_certificate() {
        let none = tls_client_config(SslMode::Disable, Some(Path::new("/nonexistent/ca.pem")));
        assert!(none.unwrap().is_none());
    }

    #[test]
    fn a_root_certificate_that_is_not_a_small_regular_file_is_refused_unread() {
        for (path, says) in [
            ("/dev/zero", "character device"),
            ("/", "a directory"),
            ("/nonexistent/ca.pem", "/nonexistent/ca.pem"),
        ] {
            let err = tls_client_config(SslMode::VerifyFull, Some(Path::new(path))).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}
