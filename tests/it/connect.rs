//! Connecting: typed errors with the server's SQLSTATE, timeouts, credential rotation.

use std::time::{Duration, Instant};

use diesel_async::SimpleAsyncConnection;
use railyard::error::ConnectStage;
use railyard::{Config, Credentials, Database, Error, Secret};
use tokio_postgres::error::SqlState;

use crate::support;

#[tokio::test]
async fn a_wrong_password_gives_28p01_and_never_shows_the_password() {
    let server = support::server().await;
    let secret = "correct-horse-battery-staple-7";
    let target = server.admin.with_password(Some(Secret::new(secret)));
    let err = Database::connect(Config::new(target)).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    let Error::Connect(e) = &err else {
        panic!("a connect error: {err}")
    };
    assert_eq!(e.stage, ConnectStage::Startup);
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

#[tokio::test]
async fn an_unknown_database_gives_3d000() {
    let server = support::server().await;
    let target = server.admin.with_dbname(&support::unique("missing"));
    let err = Database::connect(Config::new(target)).await.unwrap_err();
    assert_eq!(
        err.sqlstate(),
        Some(&SqlState::INVALID_CATALOG_NAME),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_fails_within_the_connect_timeout() {
    // A listener that accepts TCP connections and then says nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let config = Config::from_url(&format!(
        "postgres://u:pw@127.0.0.1:{port}/db?sslmode=disable"
    ))
    .unwrap()
    .connect_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let err = Database::connect(config).await.unwrap_err();
    let waited = started.elapsed();
    let Error::Connect(e) = &err else {
        panic!("a connect error: {err}")
    };
    assert_eq!(e.stage, ConnectStage::Timeout, "{err}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_closed_port_fails_at_once_naming_host_and_port() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = Config::from_url(&format!("postgres://u@127.0.0.1:{port}/db")).unwrap();
    let started = Instant::now();
    let err = Database::connect(config).await.unwrap_err();
    let Error::Connect(e) = &err else {
        panic!("a connect error: {err}")
    };
    assert_eq!(e.stage, ConnectStage::Socket);
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn the_next_host_of_a_multi_host_url_is_tried_when_the_first_is_down() {
    let server = support::server().await;
    let (host, port) = server.admin.hosts()[0].clone();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut url = server.admin.expose_url();
    url = url.replacen(
        &format!("@{host}:{port}"),
        &format!("@127.0.0.1:{dead},{host}:{port}"),
        1,
    );
    let url = format!("{url}&target_session_attrs=read-write");
    let db = Database::connect(Config::from_url(&url).unwrap())
        .await
        .expect("second host");
    assert_eq!(db.primary().await.unwrap().info().port, port);
}

#[tokio::test]
async fn a_role_over_its_connection_limit_gives_53300() {
    let server = support::server().await;
    let role = support::unique("limited");
    support::admin_sql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'limited-pw' CONNECTION LIMIT 1"
    ))
    .await;
    let target = server
        .admin
        .with_user(&role)
        .with_password(Some(Secret::new("limited-pw")));
    let first = Database::connect(Config::new(target.clone()))
        .await
        .expect("first connection");
    let _held = first.primary().await.unwrap();
    let err = Database::connect(Config::new(target)).await.unwrap_err();
    assert_eq!(
        err.sqlstate(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{err}"
    );
    drop(_held);
    drop(first);
}

#[tokio::test]
async fn a_rotated_password_is_picked_up_by_new_connections_without_restart() {
    let server = support::server().await;
    let role = support::unique("rotating");
    support::admin_sql(&format!("CREATE ROLE {role} LOGIN PASSWORD 'first-pw'")).await;
    let file = std::env::temp_dir().join(format!("{role}.pw"));
    std::fs::write(&file, "first-pw\n").unwrap();
    let config = Config::new(server.admin.with_user(&role).with_password(None))
        .credentials(Credentials::File(file.clone()))
        .pool_max_size(3)
        .checkout_timeout(Duration::from_secs(3));
    let db = Database::connect(config)
        .await
        .expect("connects with the first password");
    let held = db.primary().await.unwrap();

    support::admin_sql(&format!("ALTER ROLE {role} PASSWORD 'second-pw'")).await;
    std::fs::write(&file, "second-pw\n").unwrap();

    // The idle connection from boot is still usable, and a brand-new one (the
    // pool must open it: two are now checked out) logs in with the new password.
    let second = db.primary().await.expect("existing or new connection");
    let mut third = db
        .primary()
        .await
        .expect("a new connection with the rotated password");
    third.batch_execute("SELECT 1").await.unwrap();
    assert_ne!(held.info().backend_pid, third.info().backend_pid);
    drop((held, second, third));
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn a_connection_knows_its_host_role_and_backend_pid() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    let db = Database::connect(cluster.config_for("postgres"))
        .await
        .unwrap();
    let p = db.primary().await.unwrap();
    assert_eq!(p.info().role, railyard::conn::ServerRole::Primary);
    assert!(p.info().backend_pid > 0);
    assert_eq!(p.info().port, cluster.primary_port());
    let r = db.replica(0).await.unwrap();
    assert_eq!(r.info().role, railyard::conn::ServerRole::Standby);
    assert_eq!(Some(r.info().port), cluster.replica_port());
    let report = db.replica_report().await;
    assert!(
        matches!(
            report[0].state,
            railyard::database::ReplicaState::Reachable {
                streaming: true,
                ..
            }
        ),
        "{report:?}"
    );
}
