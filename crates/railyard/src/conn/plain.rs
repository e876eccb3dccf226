//! The connector of a build without the `tls` feature: plain TCP and Unix
//! sockets only. It has the TLS module's shape so that the opener and the
//! cancel path read the same either way; configuration validation refuses an
//! `sslmode` that needs TLS before anything connects, so the upgrade below is
//! never asked for.

use std::future::{Ready, ready};
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{NoTlsStream, TlsConnect};

use super::wire::{Tapped, WireState};
use crate::config::SslMode;
use crate::error::Error;

/// Stands for rustls's client configuration: no value of it exists.
#[derive(Debug)]
pub(crate) enum ClientConfig {}

/// `None` for the modes that may run without TLS (`disable`, `prefer`);
/// an error naming the feature for the others.
pub(crate) fn tls_client_config(
    mode: SslMode,
    _root_cert: Option<&Path>,
) -> Result<Option<Arc<ClientConfig>>, Error> {
    match mode {
        SslMode::Disable | SslMode::Prefer => Ok(None),
        other => Err(Error::tls(
            format!(
                "sslmode={} needs TLS, which this build of railyard leaves out: enable its `tls` feature",
                other.as_str()
            ),
            std::io::Error::other("built without the tls feature"),
        )),
    }
}

/// Plain connections only: the upgrade fails if it is ever asked for.
pub(crate) struct Connector {
    pub(crate) wire: Arc<WireState>,
}

impl Connector {
    /// `config` is always `None` here (no value of [`ClientConfig`] exists).
    pub(crate) fn new(
        config: Option<&Arc<ClientConfig>>,
        _host: &str,
        wire: Arc<WireState>,
    ) -> Result<Self, Error> {
        if let Some(c) = config {
            match **c {}
        }
        Ok(Connector { wire })
    }

    /// Named statements are rewritten by the socket's own tap in a plain
    /// build (see `super::unnamed`); nothing to do above it.
    pub(crate) fn unnamed(self, _on: bool) -> Self {
        self
    }
}

impl<S> TlsConnect<Tapped<S>> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = NoTlsStream;
    type Error = std::io::Error;
    type Future = Ready<std::io::Result<NoTlsStream>>;

    fn connect(self, _stream: Tapped<S>) -> Self::Future {
        self.wire.note_tls_failure();
        ready(Err(std::io::Error::other(
            "TLS was requested, but this build of railyard has no TLS (enable its `tls` feature)",
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_modes_that_need_tls_are_refused_by_name() {
        assert!(tls_client_config(SslMode::Disable, None).unwrap().is_none());
        assert!(tls_client_config(SslMode::Prefer, None).unwrap().is_none());
        for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = tls_client_config(mode, None).unwrap_err().to_string();
            assert!(
                err.contains(mode.as_str()) && err.contains("`tls` feature"),
                "{err}"
            );
        }
    }
}
