//! A background worker on Railyard: claims jobs with `FOR UPDATE SKIP
//! LOCKED` in a retried transaction (several workers never take the same
//! job), sleeps on LISTEN between batches (a gap in the notifications only
//! means it looks again), and stops on Ctrl-C after the batch in hand.
//!
//! `cargo run --example worker`, then in psql:
//! `INSERT INTO jobs (kind, payload) VALUES ('email', 'hello'); NOTIFY jobs;`.

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::{Config, Database, Migrator};
use railyard_events::{DatabaseEvents, ListenEvent};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("examples/migrations");

/// Jobs one transaction claims.
const BATCH: i64 = 50;

#[derive(Debug, QueryableByName)]
struct Job {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    payload: String,
}

/// Claims up to [`BATCH`] pending jobs, does them, marks them done; all in
/// one transaction, so a crash leaves them pending. How many it did.
async fn run_batch(db: &Database) -> Result<usize, railyard::Error> {
    db.transaction(async |conn| {
        let jobs = diesel::sql_query(
            "SELECT id, kind, payload FROM jobs WHERE done_at IS NULL \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind::<BigInt, _>(BATCH)
        .load::<Job>(conn)
        .await?;
        for job in &jobs {
            println!("job {} ({}): {}", job.id, job.kind, job.payload);
            diesel::sql_query("UPDATE jobs SET done_at = now() WHERE id = $1")
                .bind::<BigInt, _>(job.id)
                .execute(conn)
                .await?;
        }
        Ok::<_, railyard::Error>(jobs.len())
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = railyard_local::resolve(Config::from_env()?).await?;
    let db = Database::builder(config)
        .migrations(Migrator::new(MIGRATIONS))
        .connect()
        .await?;
    let mut wakeups = db.listen(["jobs"]).await?;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        // Drain what is pending, then wait for a notification, a gap (look
        // again), a timeout (a missed notification costs at most this) or Ctrl-C.
        while run_batch(&db).await? == BATCH as usize {}
        tokio::select! {
            _ = &mut stop => break,
            event = wakeups.next() => match event {
                Some(ListenEvent::Gap(g)) => println!("listener reconnected ({}): looking again", g.reason),
                Some(_) => {}
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
    drop(wakeups);
    db.close(Duration::from_secs(10)).await;
    Ok(())
}
