//! TLS with libpq's sslmode meanings, against the local cluster's generated CA.

use std::time::Duration;

use railyard::error::ConnectStage;
use railyard::{Config, Database, Error};
use tokio_postgres::error::SqlState;

use crate::support;

fn other_ca(dir: &std::path::Path) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap();
    let path = dir.join(format!("{}.crt", support::unique("wrong_ca")));
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

fn url(
    cluster: &railyard_local::LocalCluster,
    host: &str,
    mode: &str,
    ca: &std::path::Path,
) -> String {
    format!(
        "postgres://railyard@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
        cluster.primary_port(),
        ca.display()
    )
}

async fn connect(url: &str, cluster: &railyard_local::LocalCluster) -> Result<Database, Error> {
    let t: railyard::config::ConnectTarget = url.parse().unwrap();
    let config = Config::new(t.with_password(Some(cluster.password().clone())))
        .connect_timeout(Duration::from_secs(5));
    Database::connect(config).await
}

#[tokio::test]
async fn verify_full_succeeds_with_the_generated_ca() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    let db = connect(
        &url(cluster, "localhost", "verify-full", &cluster.ca_cert()),
        cluster,
    )
    .await
    .expect("verify-full against the cluster's CA");
    let conn = db.primary().await.unwrap();
    assert!(conn.info().tls, "the connection is encrypted");
    assert!(conn.wire().is_tls());
    assert!(
        conn.wire().bytes_read() > 0,
        "the tap sees decrypted traffic"
    );
}

#[tokio::test]
async fn verify_full_fails_clearly_with_a_wrong_ca() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    let ca = other_ca(&std::env::temp_dir());
    let err = connect(&url(cluster, "localhost", "verify-full", &ca), cluster)
        .await
        .unwrap_err();
    match &err {
        Error::Connect(e) => {
            assert_eq!(e.stage, ConnectStage::Tls, "{err}");
            assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        }
        other => panic!("expected a TLS connect error, got {other}"),
    }
    let _ = std::fs::remove_file(ca);
}

#[tokio::test]
async fn verify_full_fails_on_a_host_name_the_certificate_does_not_name_but_verify_ca_accepts_it() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    // An IPv4-mapped IPv6 address reaches the same server, but the certificate
    // names only `localhost` and `127.0.0.1`.
    let host = "[::ffff:127.0.0.1]";
    let err = connect(
        &url(cluster, host, "verify-full", &cluster.ca_cert()),
        cluster,
    )
    .await
    .unwrap_err();
    match &err {
        Error::Connect(e) => {
            assert_eq!(e.stage, ConnectStage::Tls, "{err}");
            assert!(err.to_string().contains("not valid for name"), "{err}");
        }
        other => panic!("expected a TLS connect error, got {other}"),
    }
    connect(
        &url(cluster, host, "verify-ca", &cluster.ca_cert()),
        cluster,
    )
    .await
    .expect("verify-ca checks the chain only");
}

#[tokio::test]
async fn sslmode_disable_against_a_tls_only_server_fails_clearly() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    let err = connect(
        &url(cluster, "localhost", "disable", &cluster.ca_cert()),
        cluster,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.sqlstate(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("no encryption"), "{text}");
    assert!(
        text.contains("sslmode=require"),
        "the error says what to do: {text}"
    );
}

#[tokio::test]
async fn require_and_prefer_encrypt_without_checking_the_certificate() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    for mode in ["require", "prefer"] {
        let u = format!(
            "postgres://railyard@[::ffff:127.0.0.1]:{}/postgres?sslmode={mode}",
            cluster.primary_port()
        );
        let db = connect(&u, cluster)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(db.primary().await.unwrap().info().tls, "{mode} encrypts");
    }
}

#[tokio::test]
async fn unix_sockets_connect_without_tls() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    let db = Database::connect(Config::new(cluster.primary_socket_target("postgres")))
        .await
        .expect("Unix-socket connection");
    let conn = db.primary().await.unwrap();
    assert!(!conn.info().tls);
    assert!(
        conn.wire().bytes_read() > 0,
        "the tap sees the socket's traffic"
    );
    assert!(matches!(conn.info().host, railyard::config::Host::Unix(_)));
}

#[tokio::test]
async fn a_missing_root_certificate_file_is_named_in_the_error() {
    let config = Config::from_url(
        "postgres://u@127.0.0.1:1/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
    )
    .unwrap();
    let err = Database::connect(config).await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the I/O error is kept as the cause: {err:?}"
    );
}

/// A host on the path (or a server set up with `password`/`md5` in
/// pg_hba.conf) asks for the password in clear or as MD5 on a plain TCP
/// stream: the connect fails before the password is written, with
/// `sslmode=disable` and with `prefer` when the server declines TLS.
#[tokio::test]
async fn a_request_for_the_password_in_clear_over_plain_tcp_is_refused_before_it_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (mode, code) in [
        ("disable", 3u32),
        ("disable", 5),
        ("prefer", 3),
        ("prefer", 5),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // The impostor: declines TLS, asks for the password, records what follows.
        let impostor = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let read_one = async |s: &mut tokio::net::TcpStream, got: &mut Vec<u8>| {
                let mut b = [0u8; 4096];
                match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                    Ok(Ok(n)) if n > 0 => {
                        got.extend_from_slice(&b[..n]);
                        n
                    }
                    _ => 0,
                }
            };
            let n = read_one(&mut s, &mut got).await;
            // An SSLRequest (length 8, code 80877103) gets 'N', then the startup.
            if n == 8 && got[4..8] == 80877103u32.to_be_bytes() {
                s.write_all(b"N").await.unwrap();
                got.clear();
                read_one(&mut s, &mut got).await;
            }
            let mut msg = vec![b'R', 0, 0, 0, 0];
            msg.extend_from_slice(&code.to_be_bytes());
            if code == 5 {
                msg.extend_from_slice(&[1, 2, 3, 4]);
            }
            let len = (msg.len() - 1) as u32;
            msg[1..5].copy_from_slice(&len.to_be_bytes());
            s.write_all(&msg).await.unwrap();
            // Whatever the client sends next, until it hangs up.
            let mut after = Vec::new();
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                after.extend_from_slice(&buf[..n]);
            }
            after
        });
        let secret = railyard::config::Secret::new("hunter2-never-sent".to_owned());
        let t: railyard::config::ConnectTarget =
            format!("postgres://railyard@127.0.0.1:{port}/postgres?sslmode={mode}")
                .parse()
                .unwrap();
        let config =
            Config::new(t.with_password(Some(secret))).connect_timeout(Duration::from_secs(5));
        let err = Database::connect(config).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("asked for the password in clear or as MD5"),
            "sslmode={mode}, code {code}: {text}"
        );
        let after = impostor.await.unwrap();
        assert!(
            !after.windows(7).any(|w| w == b"hunter2") && !after.contains(&b'p'),
            "sslmode={mode}, code {code}: the client answered the request: {after:?}"
        );
    }
}
