//! The server the harness works on: where it is (`TEST_DATABASE_URL` or the
//! local cluster), the connections it keeps between tests on a background
//! runtime, and the migrated template and shared test database it prepares
//! once per migration set under a cross-process lock.

use super::*;
/// A prepared server: where the template and the shared test database are.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    /// A superuser target on the `postgres` database.
    pub(super) admin: ConnectTarget,
    pub(super) template: String,
    pub(super) shared: String,
}

pub(super) fn prepared_cache()
-> &'static Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Prepared>>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Prepared>>>>> =
        OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The server the harness uses: `TEST_DATABASE_URL`, or the local cluster
/// (over its Unix socket).
pub(super) async fn admin_target() -> Result<ConnectTarget, Error> {
    if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
        let t: ConnectTarget = url.parse().map_err(|mut e: ConfigError| {
            e.field = format!("TEST_DATABASE_URL ({})", e.field);
            e
        })?;
        return Ok(t.with_dbname("postgres"));
    }
    let cluster = LocalCluster::shared().await.map_err(|e| {
        ConfigError::hidden(
            "TEST_DATABASE_URL",
            format!("not set, and the local PostgreSQL cluster that stands in for it could not start: {e}"),
        )
    })?;
    Ok(cluster.primary_socket_target("postgres"))
}

pub(super) async fn connect(target: ConnectTarget) -> Result<Conn, Error> {
    // Instrumented without hooks: only so that a test can count its
    // statements (`assert_max_queries`); nothing is formatted otherwise.
    let config = Arc::new(Config::new(target.clone()));
    railyard::observe::recorded(Opener::new(target, config, TargetSessionAttrs::Any)?)
        .open()
        .await
}

/// A runtime that drives the harness's connections, so that a connection can
/// outlive the test (and the per-test runtime) that opened it and serve the
/// next test: no connect, TLS or authentication per test.
pub(super) fn background() -> &'static tokio::runtime::Runtime {
    static BG: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    BG.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("railyard-harness")
            .enable_all()
            .build()
            .expect("the harness's background runtime")
    })
}

pub(super) fn idle() -> &'static Mutex<HashMap<String, Vec<Conn>>> {
    static IDLE: OnceLock<Mutex<HashMap<String, Vec<Conn>>>> = OnceLock::new();
    IDLE.get_or_init(Default::default)
}

/// A connection to `target` that is idle and outside any transaction: reused
/// from an earlier test, or opened on the background runtime.
pub(super) async fn checkout(target: &ConnectTarget) -> Result<Conn, Error> {
    let key = target.to_string();
    loop {
        let reused = idle()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&key)
            .and_then(Vec::pop);
        match reused {
            Some(mut c) => {
                if c.wire().is_settled_idle() && c.transaction_depth() == 0 {
                    return Ok(c);
                }
            }
            None => break,
        }
    }
    let t = target.clone();
    background()
        .spawn(connect(t))
        .await
        .map_err(|e| Error::TestIsolation(format!("the harness's connect task failed: {e}")))?
}

pub(super) fn checkin(target: &ConnectTarget, mut conn: Conn) {
    if conn.wire().is_settled_idle() && conn.transaction_depth() == 0 {
        idle()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(target.to_string())
            .or_default()
            .push(conn);
    }
}

pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Serialises database creation across processes (CREATE DATABASE … TEMPLATE
/// needs the template idle, and two processes must not both make it), and
/// with `railyard local gc`.
use railyard_local::scratch::{HARNESS_LOCK, TEMPLATE_READY};

pub(super) async fn with_harness_lock<T>(
    admin: &mut Conn,
    f: impl AsyncFnOnce(&mut Conn) -> Result<T, Error>,
) -> Result<T, Error> {
    admin
        .batch_execute(&format!("SELECT pg_advisory_lock({HARNESS_LOCK})"))
        .await?;
    let r = f(admin).await;
    let _ = admin
        .batch_execute(&format!("SELECT pg_advisory_unlock({HARNESS_LOCK})"))
        .await;
    r
}

#[derive(diesel::QueryableByName)]
pub(super) struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub(super) ok: bool,
}

pub(super) async fn database_exists(
    admin: &mut Conn,
    name: &str,
    ready_only: bool,
) -> Result<bool, Error> {
    use diesel_async::RunQueryDsl;
    let sql = if ready_only {
        "SELECT EXISTS (SELECT 1 FROM pg_database d JOIN pg_shdescription s ON s.objoid = d.oid \
         AND s.classoid = 'pg_database'::regclass WHERE d.datname = $1 AND s.description LIKE 'railyard template ready%') AS ok"
    } else {
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS ok"
    };
    let f: Flag = diesel::sql_query(sql)
        .bind::<diesel::sql_types::Text, _>(name)
        .get_result(admin)
        .await?;
    Ok(f.ok)
}

/// Ends the sessions still connected to the template, so that `CREATE
/// DATABASE … TEMPLATE` can copy it. Under the harness lock nobody uses the
/// template, but a pooler in front of the server (PgBouncer in session mode)
/// keeps the migration run's server connection open after it ended.
pub(super) async fn release_template(admin: &mut Conn, template: &str) -> Result<(), Error> {
    use diesel_async::RunQueryDsl;
    diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind::<diesel::sql_types::Text, _>(template)
    .execute(admin)
    .await?;
    Ok(())
}

/// Once per process, on the local cluster: reclaims what dead runs left
/// (their scratch databases and private clusters) and templates not prepared
/// for an hour.
pub(super) async fn reap_once() {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if std::env::var_os("TEST_DATABASE_URL").is_some()
        || STARTED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    let Ok(cluster) = LocalCluster::shared().await else {
        return;
    };
    match cluster.gc(std::time::Duration::from_secs(3600)).await {
        Ok(r) if r.bytes() > 0 => eprintln!(
            "railyard test harness: reclaimed {} MB left by earlier runs ({} databases, {} templates, {} clusters)",
            r.bytes() / 1_000_000,
            r.databases.len(),
            r.templates.len(),
            r.clusters.len()
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(target: "railyard::test", error = %e, "could not reclaim earlier runs' leftovers")
        }
    }
}

/// Creates (once per migration set, across processes) the migrated template and
/// the shared test database cloned from it.
// Long by design: the template and the shared database are made under one lock, in one order.
pub(super) async fn prepare(migrations: fn() -> Migrator) -> Result<Prepared, Error> {
    let migrator = migrations();
    let fingerprint = migrator.fingerprint()?;
    let cell = {
        let mut cache = prepared_cache().lock().unwrap_or_else(|p| p.into_inner());
        cache.entry(fingerprint.clone()).or_default().clone()
    };
    cell.get_or_try_init(|| async {
        let admin_target = admin_target().await?;
        let template = format!("railyard_tpl_{fingerprint}");
        let shared = format!("railyard_test_{fingerprint}");
        reap_once().await;
        let mut admin = connect(admin_target.clone()).await?;
        with_harness_lock(&mut admin, async |admin| {
            if !database_exists(admin, &template, true).await? {
                admin
                    .batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        quote_ident(&template)
                    ))
                    .await?;
                admin
                    .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&template)))
                    .await?;
                let config = Config::new(admin_target.with_dbname(&template));
                // The template starts empty: the backup before a risky
                // migration is a pg_dump into a directory removed after the
                // run (never the application's pgBackRest or dump directory).
                let dumps = std::env::temp_dir().join(format!(
                    "railyard-tpl-dumps-{}-{fingerprint}",
                    std::process::id()
                ));
                let run = migrator
                    .clone()
                    .backup_before_risky(railyard::migrate::BeforeRisky::pg_dump(&dumps))
                    .run(&config)
                    .await;
                let _ = tokio::fs::remove_dir_all(&dumps).await;
                if let Err(e) = run {
                    // No half-made template stays behind.
                    let _ = admin
                        .batch_execute(&format!(
                            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                            quote_ident(&template)
                        ))
                        .await;
                    return Err(e);
                }
            }
            // When it was last prepared: `railyard local gc` keeps recent ones.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            admin
                .batch_execute(&format!(
                    "COMMENT ON DATABASE {} IS '{TEMPLATE_READY}; prepared={now}'",
                    quote_ident(&template)
                ))
                .await?;
            if !database_exists(admin, &shared, false).await? {
                release_template(admin, &template).await?;
                admin
                    .batch_execute(&format!(
                        "CREATE DATABASE {} TEMPLATE {}",
                        quote_ident(&shared),
                        quote_ident(&template)
                    ))
                    .await?;
            }
            Ok(())
        })
        .await?;
        Ok::<_, Error>(Prepared {
            admin: admin_target,
            template,
            shared,
        })
    })
    .await
    .cloned()
}

// The attribute's plumbing: what `#[railyard_test::test]` expands to,
// public only so that the expansion can name it.
