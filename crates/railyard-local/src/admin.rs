//! The administrative connection to a local server, over its Unix socket,
//! and the wait for the replica to stream.

use std::path::Path;
use std::time::{Duration, Instant};

use railyard::config::Secret;

use crate::error::Error;
use crate::{LocalCluster, USER};

pub(crate) async fn admin_client(
    cluster: &LocalCluster,
    db: &str,
) -> Result<tokio_postgres::Client, Error> {
    admin_client_port(
        &cluster.dir,
        cluster.state.primary_port,
        &cluster.state.password,
        db,
    )
    .await
}

#[doc(hidden)]
pub async fn admin_client_port(
    dir: &Path,
    port: u16,
    password: &Secret,
    db: &str,
) -> Result<tokio_postgres::Client, Error> {
    let mut c = tokio_postgres::Config::new();
    c.host_path(dir.join("pg/sockets"))
        .port(port)
        .user(USER)
        .password(password.expose())
        .dbname(db)
        .application_name("railyard-local");
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.map_err(|e| {
        Error::Local(format!(
            "connecting to the local server on port {port}: {e}"
        ))
    })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Waits, up to 60 s, until the primary behind `client` streams to the
/// local replica; `when` says which start the error is about.
pub(crate) async fn replica_streams(
    client: &tokio_postgres::Client,
    when: &str,
) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'railyard_replica' AND state = 'streaming'",
                &[],
            )
            .await
            .map_err(|e| Error::Local(format!("checking replication: {e}")))?;
        if row.get::<_, i64>(0) > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Local(format!(
                "the replica did not stream {when} within 60 s; see pg/replica.log"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
