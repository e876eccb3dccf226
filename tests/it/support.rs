//! The shared harness of the integration tests: one server for the whole run (the
//! local cluster, or `TEST_DATABASE_URL`), and helpers for throwaway databases and
//! roles.

use std::time::{SystemTime, UNIX_EPOCH};

use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::config::ConnectTarget;
use railyard::{Config, Database};
use railyard_local::LocalCluster;
use tokio::sync::OnceCell;

/// The server the tests run against.
pub struct Server {
    /// The local cluster, when `TEST_DATABASE_URL` is not set.
    pub cluster: Option<LocalCluster>,
    /// A superuser target on the `postgres` database.
    pub admin: ConnectTarget,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

pub async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
                let t: ConnectTarget = url.parse().expect("TEST_DATABASE_URL is a postgres URL");
                return Server {
                    cluster: None,
                    admin: t.with_dbname("postgres"),
                };
            }
            let cluster = LocalCluster::shared()
                .await
                .expect("the local cluster starts (or set TEST_DATABASE_URL)");
            // What killed runs left: their scratch databases and clusters.
            match cluster.gc(std::time::Duration::from_secs(3600)).await {
                Ok(r) if r.bytes() > 0 => eprintln!(
                    "reclaimed {} MB left by earlier runs",
                    r.bytes() / 1_000_000
                ),
                Ok(_) => {}
                Err(e) => eprintln!("could not reclaim earlier runs' leftovers: {e}"),
            }
            Server {
                admin: cluster.primary_target("postgres"),
                cluster: Some(cluster),
            }
        })
        .await
}

/// The local cluster, for tests that need its CA, its replica or its socket.
pub async fn cluster() -> Option<&'static LocalCluster> {
    server().await.cluster.as_ref()
}

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    format!(
        "{prefix}_{}_{nanos:x}_{:x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Runs SQL as the superuser on the `postgres` database.
pub async fn admin_sql(sql: &str) {
    let db = Database::connect(Config::new(server().await.admin.clone()).pool_max_size(1))
        .await
        .expect("admin connection");
    let mut conn = db.primary().await.expect("admin checkout");
    conn.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("admin SQL failed: {sql}: {e}"));
}

/// An empty database of one test, dropped when this is dropped (a panic
/// included); a killed run's are marked with its process, for the next run to
/// drop.
pub struct FreshDb {
    pub name: String,
    pub config: Config,
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run on a runtime thread: the drop runs on a thread of its own.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(try_admin_sql(&format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// Creates an empty database and returns a config for it (primary only).
pub async fn fresh_database(prefix: &str) -> FreshDb {
    let name = unique(prefix);
    // Two statements: CREATE DATABASE cannot share an implicit transaction.
    admin_sql(&format!("CREATE DATABASE {name}")).await;
    admin_sql(&format!(
        "COMMENT ON DATABASE {name} IS '{}'",
        railyard_local::scratch::scratch_comment()
    ))
    .await;
    let target = server().await.admin.with_dbname(&name);
    FreshDb {
        name,
        config: Config::new(target),
    }
}

/// Runs SQL as the superuser on the `postgres` database, returning failure.
async fn try_admin_sql(sql: &str) -> Result<(), railyard::Error> {
    let db = Database::connect(Config::new(server().await.admin.clone()).pool_max_size(1)).await?;
    let mut conn = db.primary().await?;
    conn.batch_execute(sql).await?;
    Ok(())
}

/// Counts, as the superuser on `postgres`: a query returning one bigint `n`.
pub async fn count_admin(sql: &str) -> i64 {
    count(&Config::new(server().await.admin.clone()), sql).await
}

/// Counts rows of a query returning one bigint column named `n`.
pub async fn count(config: &Config, sql: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let db = Database::connect(config.clone().pool_max_size(1))
        .await
        .expect("connect for count");
    let mut conn = db.primary().await.expect("checkout");
    diesel::sql_query(sql)
        .get_result::<N>(&mut **conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .n
}

/// The ledger's migrations.
pub const LEDGER: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("migrations");

/// How many migrations the ledger has.
pub fn ledger_migrations() -> usize {
    diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&LEDGER)
        .expect("the embedded migrations list")
        .len()
}

/// Where the `pg_dump` taken before the ledger's risky migration goes while a
/// ledger database boots: a directory of its own, removed when this is
/// dropped (a panic included). Boot the ledger with [`Dumps::migrator`] and
/// keep this until `connect` returned.
pub struct Dumps {
    dir: std::path::PathBuf,
}

impl Dumps {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("railyard-it-dumps"));
        std::fs::create_dir_all(&dir).expect("a directory for the risky migration's dump");
        Dumps { dir }
    }

    /// The directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The ledger's migrator, dumping before risky migrations into this
    /// directory.
    pub fn migrator(&self) -> railyard::Migrator {
        railyard::Migrator::new(LEDGER)
            .backup_before_risky(railyard::migrate::BeforeRisky::pg_dump(&self.dir))
    }

    /// The same, dumping from `direct` (behind a transaction-mode pooler,
    /// pg_dump runs only on a direct connection).
    pub fn migrator_direct(&self, direct: railyard::config::ConnectTarget) -> railyard::Migrator {
        railyard::Migrator::new(LEDGER)
            .backup_before_risky(railyard::migrate::BeforeRisky::pg_dump(&self.dir).direct(direct))
    }
}

impl Drop for Dumps {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The name of the shared ledger database: `railyard_it_` and the fingerprint
/// of the ledger's migrations, so that a changed migration (even a comment or
/// its down.sql) gets a database of its own instead of the refusal an
/// edited, already-applied migration meets at boot.
pub fn ledger_name() -> String {
    format!(
        "railyard_it_{}",
        railyard::Migrator::new(LEDGER)
            .fingerprint()
            .expect("the ledger's migrations")
    )
}

static LEDGER_DB: OnceCell<ConnectTarget> = OnceCell::const_new();
static PRUNED: OnceCell<()> = OnceCell::const_new();

/// Marks this run's shared ledger as used now, and drops the ledgers of other
/// migration fingerprints (each changed migration leaves its predecessor's
/// behind) that no run has used for a day and nobody is connected to.
async fn prune_old_ledgers() {
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let current = ledger_name();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let db = Database::connect(Config::new(server().await.admin.clone()).pool_max_size(1))
        .await
        .expect("admin connection");
    let mut conn = db.primary().await.expect("admin checkout");
    conn.batch_execute(&format!(
        "COMMENT ON DATABASE \"{current}\" IS 'railyard it ledger; used={now}'"
    ))
    .await
    .expect("marking the shared ledger as used");
    let stale: Vec<Name> = diesel::sql_query(
        "SELECT d.datname::text AS name FROM pg_database d \
         LEFT JOIN pg_shdescription s ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass \
         WHERE d.datname LIKE 'railyard\\_it\\_%' AND d.datname <> $1 \
         AND coalesce(substring(s.description FROM 'used=([0-9]+)')::int8, 0) < $2 \
         AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
    )
    .bind::<diesel::sql_types::Text, _>(&current)
    .bind::<diesel::sql_types::BigInt, _>(now - 86_400)
    .load(&mut conn)
    .await
    .expect("listing old shared ledgers");
    for Name { name } in stale {
        // Someone may have connected since: then it stays, for a later run.
        if conn
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .await
            .is_ok()
        {
            eprintln!("dropped {name}, the shared ledger of older migrations");
        }
    }
    drop(conn);
    db.close(std::time::Duration::from_secs(2)).await;
}

/// A migrated ledger database shared by the tests that commit data of their own
/// (each uses keys no other test uses). Reached over the Unix socket when the
/// local cluster is in use, which keeps round trips cheap.
pub async fn ledger(config: impl FnOnce(Config) -> Config) -> Database {
    let target = LEDGER_DB
        .get_or_init(|| async {
            let server = server().await;
            let name = ledger_name();
            let name = name.as_str();
            match &server.cluster {
                Some(c) => {
                    c.create_database(name).await.expect("ledger database");
                    c.primary_socket_target(name)
                }
                None => {
                    let t = server.admin.with_dbname(name);
                    let db = Database::connect(Config::new(server.admin.clone()).pool_max_size(1))
                        .await
                        .expect("admin");
                    let mut conn = db.primary().await.expect("admin checkout");
                    let _ = conn.batch_execute(&format!("CREATE DATABASE {name}")).await;
                    t
                }
            }
        })
        .await
        .clone();
    PRUNED.get_or_init(prune_old_ledgers).await;
    let dumps = Dumps::new();
    let db = Database::builder(config(Config::new(target)))
        .migrations(dumps.migrator())
        .connect()
        .await
        .expect("ledger database boots");
    drop(dumps);
    db
}

/// Creates a user with `n` accounts holding `balance` cents each; returns the
/// account ids.
pub async fn accounts(db: &Database, n: usize, balance: i64) -> Vec<i64> {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let email = format!("{}@example.test", unique("user"));
    let mut conn = db.primary().await.expect("checkout");
    let user: Id =
        diesel::sql_query("INSERT INTO users (email, name) VALUES ($1, 'Test') RETURNING id")
            .bind::<diesel::sql_types::Text, _>(&email)
            .get_result(&mut conn)
            .await
            .expect("user");
    let mut ids = Vec::new();
    for _ in 0..n {
        let a: Id = diesel::sql_query(
            "INSERT INTO accounts (user_id, balance_cents) VALUES ($1, $2) RETURNING id",
        )
        .bind::<diesel::sql_types::BigInt, _>(user.id)
        .bind::<diesel::sql_types::BigInt, _>(balance)
        .get_result(&mut conn)
        .await
        .expect("account");
        ids.push(a.id);
    }
    ids
}

/// Adds a user with this email (the tests' usual row).
pub async fn insert_user(conn: &mut railyard::Conn, email: &str) -> Result<(), railyard::Error> {
    diesel::sql_query("INSERT INTO users (email, name) VALUES ($1, 'it')")
        .bind::<diesel::sql_types::Text, _>(email)
        .execute(conn)
        .await?;
    Ok(())
}

/// How many users have this email (0 or 1).
pub async fn count_user(conn: &mut railyard::Conn, email: &str) -> Result<i64, railyard::Error> {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    Ok(
        diesel::sql_query("SELECT count(*) AS n FROM users WHERE email = $1")
            .bind::<diesel::sql_types::Text, _>(email)
            .get_result::<N>(conn)
            .await?
            .n,
    )
}

/// An account's balance, in cents.
pub async fn balance(conn: &mut railyard::Conn, id: i64) -> Result<i64, railyard::Error> {
    #[derive(diesel::QueryableByName)]
    struct B {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let b: B = diesel::sql_query("SELECT balance_cents AS n FROM accounts WHERE id = $1")
        .bind::<diesel::sql_types::BigInt, _>(id)
        .get_result(conn)
        .await?;
    Ok(b.n)
}

/// The contended ledger workload: `tasks` tasks, each making `per_task`
/// serializable transfers between the 4 accounts `ids` (a transfer that would
/// overdraw moves nothing); every transfer must complete through retries.
/// Returns the transfers made.
pub async fn contended_transfers(db: &Database, ids: &[i64], tasks: u64, per_task: u64) -> u64 {
    assert_eq!(ids.len(), 4, "the workload moves money between 4 accounts");
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (db, ids) = (db.clone(), ids.to_vec());
            tokio::spawn(async move {
                let mut done = 0;
                for i in 0..per_task {
                    let from = ids[((task + i) % 4) as usize];
                    let to = ids[((task * 7 + i * 3 + 1) % 4) as usize];
                    if from == to {
                        continue;
                    }
                    let amount = ((task * 31 + i * 17) % 100 + 1) as i64;
                    db.build_transaction()
                        .serializable()
                        .run(async |conn| {
                            if balance(conn, from).await? >= amount {
                                // Rows are updated in id order, so transfers in opposite
                                // directions conflict (40001) instead of deadlocking.
                                let mut moves = [(from, -amount), (to, amount)];
                                moves.sort();
                                for (id, delta) in moves {
                                    diesel::sql_query(
                                        "UPDATE accounts SET balance_cents = balance_cents + $2 WHERE id = $1",
                                    )
                                    .bind::<diesel::sql_types::BigInt, _>(id)
                                    .bind::<diesel::sql_types::BigInt, _>(delta)
                                    .execute(conn)
                                    .await?;
                                }
                            }
                            Ok::<_, railyard::Error>(())
                        })
                        .await
                        .expect("every transfer completes through retries");
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut transfers = 0;
    for h in handles {
        transfers += h.await.expect("a transfer task");
    }
    transfers
}

/// The sum of the balances of `ids`.
pub async fn total_balance(db: &Database, ids: &[i64]) -> i64 {
    let mut conn = db.primary().await.expect("checkout");
    let mut total = 0;
    for id in ids {
        total += balance(&mut conn, *id).await.expect("balance");
    }
    total
}

/// A private cluster of one test (a primary, and a streaming replica when
/// `replica`), in a directory of its own, marked as this process's so that
/// a killed run's is reaped by the next; the test calls `destroy` at its end.
pub async fn private_cluster(name: &str, replica: bool) -> railyard_local::LocalCluster {
    server().await;
    let dir = std::env::temp_dir().join(unique(name));
    railyard_local::LocalCluster::builder()
        .dir(&dir)
        .ephemeral(true)
        .replica(replica)
        .start()
        .await
        .expect("private cluster")
}

/// A finished command's exit code, stdout and stderr, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An error and its causes, one per line, as the CLI prints them (each
/// layer's `Display` names its own step; its cause is `source()`).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str("\ncaused by: ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
