//! Configuration values that only the server, or a real connection, can judge:
//! the time zone, the password file, the CA file.

use std::time::{Duration, Instant};

use railyard::error::ConnectStage;
use railyard::{Config, Credentials, Database, Error};
use tokio_postgres::error::SqlState;

use crate::support;

/// The connect error of `config`, which must fail.
async fn connect_error(config: Config) -> railyard::error::ConnectError {
    match Database::connect(config).await {
        Ok(_) => panic!("the connection should fail"),
        Err(Error::Connect(e)) => e,
        Err(e) => panic!("a connect error: {e}"),
    }
}

#[tokio::test]
async fn a_time_zone_the_server_does_not_know_is_named_with_its_variable() {
    let server = support::server().await;
    let config = Config::from_vars([
        ("DATABASE_URL", server.admin.expose_url().as_str()),
        ("RAILYARD_TIME_ZONE", "Mars/Olympus"),
        ("RAILYARD_POOL_MAX_SIZE", "1"),
    ])
    .expect("Mars/Olympus has the shape of a time zone");
    let e = connect_error(config).await;
    assert_eq!(e.stage, ConnectStage::Setup, "{e}");
    assert_eq!(e.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{e}");
    assert_eq!(
        e.message,
        r#"RAILYARD_TIME_ZONE "Mars/Olympus" is not a time zone the server knows"#
    );
    assert!(e.to_string().contains("(SQLSTATE 22023)"), "{e}");
    assert!(
        std::error::Error::source(&e).is_some(),
        "the server's error is kept as the cause"
    );

    // Set with the setter, the error names the setter.
    let config = Config::new(server.admin.clone())
        .pool_max_size(1)
        .time_zone("Mars/Olympus");
    let e = connect_error(config).await;
    assert!(
        e.message.starts_with(r#"Config::time_zone "Mars/Olympus""#),
        "{e}"
    );
}

#[tokio::test]
async fn a_known_time_zone_is_the_session_s() {
    let server = support::server().await;
    let config = Config::from_vars([
        ("DATABASE_URL", server.admin.expose_url().as_str()),
        ("RAILYARD_TIME_ZONE", "Europe/Paris"),
    ])
    .unwrap();
    let n = support::count(
        &config,
        "SELECT count(*) AS n FROM pg_settings WHERE name = 'TimeZone' AND setting = 'Europe/Paris'",
    )
    .await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_password_file_that_is_not_a_small_regular_file_fails_at_once() {
    let server = support::server().await;
    let dir = std::env::temp_dir().join(support::unique("pwfile"));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let long = dir.join("long");
    std::fs::write(&long, vec![b'x'; 70_000]).unwrap();
    for (path, says) in [
        ("/dev/zero".into(), "character device"),
        (dir.clone(), "a directory"),
        (fifo, "a FIFO"),
        (long, "65536"),
    ] {
        let config = Config::new(server.admin.with_password(None))
            .credentials(Credentials::File(path))
            .pool_max_size(1);
        let started = Instant::now();
        let e = connect_error(config).await;
        assert!(started.elapsed() < Duration::from_secs(5), "{e}");
        assert_eq!(e.stage, ConnectStage::Credentials, "{e}");
        assert!(e.message.contains(says), "{e}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn sslmode_disable_never_reads_the_root_certificate() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    // The socket target says sslmode=disable; the CA path does not exist.
    let url = cluster.primary_socket_target("postgres").expose_url();
    let config = Config::from_vars([
        ("DATABASE_URL", url.as_str()),
        ("RAILYARD_SSLROOTCERT", "/nonexistent/ca.pem"),
        ("RAILYARD_POOL_MAX_SIZE", "1"),
    ])
    .unwrap();
    Database::connect(config)
        .await
        .expect("no CA file is read without TLS");
}

/// The primary under another name (its Unix socket, where the primary URL
/// says 127.0.0.1) passes every check a URL alone allows; at boot the
/// "replica" says it is not in recovery and is the same server: refused,
/// naming the setting.
#[tokio::test]
async fn the_primary_listed_as_a_replica_under_another_name_is_refused_at_boot() {
    let Some(cluster) = support::cluster().await else {
        return; // TEST_DATABASE_URL: no second name for the server is known
    };
    let primary = cluster.primary_target("postgres");
    let config = Config::new(primary.clone())
        .pool_max_size(1)
        .replica(cluster.primary_socket_target("postgres"));
    match Database::connect(config).await {
        Err(Error::Config(e)) => {
            assert_eq!(e.field, "replica URL 1", "{e}");
            assert!(e.reason.contains("reaches the primary itself"), "{e}");
        }
        Err(e) => panic!("a configuration error: {e}"),
        Ok(_) => panic!("the primary as its own replica was accepted"),
    }

    // The same through the environment names the variable.
    let url = primary.expose_url();
    let socket = cluster.primary_socket_target("postgres").expose_url();
    let config = Config::from_vars([
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_REPLICA_URLS", socket.as_str()),
        ("RAILYARD_POOL_MAX_SIZE", "1"),
    ])
    .expect("the URLs differ");
    match Database::connect(config).await {
        Err(Error::Config(e)) => assert_eq!(e.field, "DATABASE_REPLICA_URLS", "{e}"),
        other => panic!(
            "a configuration error naming the variable: {:?}",
            other.err()
        ),
    }

    // The real standby is accepted, and its first connection is warm.
    let config = Config::new(primary).replica(cluster.replica_target("postgres").unwrap());
    let db = Database::connect(config)
        .await
        .expect("a standby is a replica");
    assert_eq!(
        db.pool_status()
            .iter()
            .filter(|p| p.connections > 0)
            .count(),
        2
    );
}

/// In the development profile, with no `DATABASE_URL`, the core refuses to
/// guess (it cannot start servers: that is `railyard-local`'s job) and says
/// what to do; `railyard_local::resolve` then joins the local cluster and
/// creates a database named after the application, with its replica.
#[tokio::test]
async fn with_no_database_url_the_development_profile_uses_the_local_cluster() {
    if support::cluster().await.is_none() {
        return; // TEST_DATABASE_URL: the local cluster is not the server here
    }
    let app = support::unique("devapp");
    let config = Config::from_vars([
        ("RAILYARD_ENV", "development"),
        ("RAILYARD_APPLICATION_NAME", app.as_str()),
        ("RAILYARD_POOL_MAX_SIZE", "2"),
    ])
    .unwrap();
    assert_eq!(config.local_database(), Some(app.as_str()));
    // Dropped at the end, a failure included.
    let _guard = support::FreshDb {
        name: app.clone(),
        config: config.clone(),
    };
    let dumps = support::Dumps::new();
    let refused = Database::builder(config.clone())
        .migrations(dumps.migrator())
        .connect()
        .await
        .expect_err("the core starts no cluster");
    let text = refused.to_string();
    assert!(
        text.contains("DATABASE_URL") && text.contains("railyard-local"),
        "{text}"
    );
    let config = railyard_local::resolve(config)
        .await
        .expect("the local cluster stands in");
    let db = Database::builder(config)
        .migrations(dumps.migrator())
        .connect()
        .await
        .expect("the resolved config connects");
    assert_eq!(db.config().primary().dbname(), Some(app.as_str()));
    assert_eq!(db.config().replicas().len(), 1, "with its replica");
    assert_eq!(db.config().pool().max_size, 2, "other settings are kept");
    let n = support::count_admin(&format!(
        "SELECT count(*) AS n FROM pg_database WHERE datname = '{app}'"
    ))
    .await;
    assert_eq!(n, 1);
}
