//! pgbench's built-in TPC-B-like script on the same server and the same
//! number of clients, in a scratch database: a figure for scale, not a
//! comparison (its transactions are simpler than a trade).

use std::path::PathBuf;
use std::time::Duration;

use diesel_async::SimpleAsyncConnection;
use railyard::Database;
use railyard::config::Host;
use railyard_local::LocalCluster;

use super::PgbenchFigure;

/// Finds `pgbench`: next to the local cluster's server binaries, in the
/// PostgreSQL install directories, or on PATH.
fn binary(cluster: Option<&LocalCluster>) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(c) = cluster {
        candidates.push(c.bindir().join("pgbench"));
    }
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = dirs
            .flatten()
            .map(|d| d.path().join("bin/pgbench"))
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|p| p.join("pgbench")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Runs pgbench for `seconds` with `clients` clients; its database is created
/// and dropped here.
pub async fn run(
    db: &Database,
    cluster: Option<&LocalCluster>,
    clients: usize,
    seconds: u64,
) -> Result<PgbenchFigure, String> {
    let bin =
        binary(cluster).ok_or("pgbench not found (it comes with the PostgreSQL server package)")?;
    let name = format!("railyard_pgbench_{}", std::process::id());
    let mut conn = db.primary().await.map_err(|e| e.to_string())?;
    conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .map_err(|e| e.to_string())?;
    conn.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("creating its scratch database: {e}"))?;
    let result = bench(db, &bin, &name, clients, seconds).await;
    let dropped = conn
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    if let Err(e) = dropped {
        tracing::warn!(database = %name, error = %e, "could not drop pgbench's scratch database");
    }
    result
}

// Long by design: pgbench's run, its parse and its figures, in order.
async fn bench(
    db: &Database,
    bin: &std::path::Path,
    dbname: &str,
    clients: usize,
    seconds: u64,
) -> Result<PgbenchFigure, String> {
    let target = db.config().primary();
    let (host, port) = target.hosts().first().ok_or("no host")?;
    let mut env: Vec<(&str, String)> = vec![
        (
            "PGHOST",
            match host {
                Host::Tcp(h) => h.clone(),
                Host::Unix(p) => p.display().to_string(),
                _ => return Err("unsupported host kind".into()),
            },
        ),
        ("PGPORT", port.to_string()),
        ("PGDATABASE", dbname.to_owned()),
        ("PGAPPNAME", "railyard-load-pgbench".into()),
        ("PGCONNECT_TIMEOUT", "5".into()),
    ];
    if let Some(u) = target.user() {
        env.push(("PGUSER", u.to_owned()));
    }
    if let Some(p) = target.password() {
        env.push(("PGPASSWORD", p.expose().to_owned()));
    }
    if let Some(m) = target.ssl_mode() {
        env.push(("PGSSLMODE", m.as_str().to_owned()));
    }
    if let Some(root) = target.ssl_root_cert() {
        env.push(("PGSSLROOTCERT", root.display().to_string()));
    }
    let run = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(args).env_remove("PGSERVICE").kill_on_drop(true);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        async move {
            let out = tokio::time::timeout(Duration::from_secs(seconds + 120), cmd.output())
                .await
                .map_err(|_| "pgbench did not finish in time".to_owned())?
                .map_err(|e| format!("running pgbench: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                Ok(text)
            } else {
                Err(format!(
                    "pgbench failed ({}): {}",
                    out.status,
                    text.lines().last().unwrap_or("")
                ))
            }
        }
    };
    run(vec!["-i".into(), "-q".into(), "-s".into(), "1".into()]).await?;
    let threads = clients.min(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let out = run(vec![
        "-n".into(),
        "-c".into(),
        clients.to_string(),
        "-j".into(),
        threads.to_string(),
        "-T".into(),
        seconds.to_string(),
    ])
    .await?;
    let field = |prefix: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Ok(PgbenchFigure {
        clients,
        seconds,
        tps: field("tps").ok_or_else(|| format!("no tps in pgbench's output: {out}"))?,
        latency_ms: field("latency average").unwrap_or(0.0),
    })
}
