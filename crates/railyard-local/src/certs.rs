//! The cluster's certificates: a CA, and a server certificate it signs for
//! `localhost` and `127.0.0.1`, generated at the first start.

use std::path::Path;

use crate::error::Error;
use crate::{RunAs, write_file};

pub(crate) fn generate_certs(dir: &Path, pg: &Path, run_as: &RunAs) -> Result<(), Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let err = |e: rcgen::Error| Error::Local(format!("generating certificates: {e}"));
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "railyard local CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = params.signed_by(&server_key, &issuer).map_err(err)?;

    write_file(&dir.join("ca.crt"), ca.pem().as_bytes(), 0o644, None)?;
    write_file(
        &pg.join("server.crt"),
        server.pem().as_bytes(),
        0o644,
        Some(run_as),
    )?;
    write_file(
        &pg.join("server.key"),
        server_key.serialize_pem().as_bytes(),
        0o600,
        Some(run_as),
    )?;
    Ok(())
}
