//! The baseline: the same workload written on raw tokio-postgres, the way a
//! user without Railyard would write it. One connection per worker in a
//! simple pool, each statement prepared once per connection, every read on the
//! primary, and a naive retry loop: serialization failures, deadlocks and lost
//! connections are retried at once, up to ten times, with no budget, no
//! backoff and no notion of an ambiguous commit (the idempotency keys are what
//! keep its retries from placing an order twice).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use railyard::config::{ConnectTarget, Host};
use railyard::{ErrorClass, SslMode};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::engine::Engine;
use super::plan::{Action, OpKind, Planned};
use super::record::{Outcome, Step};
use crate::app::ledger::{Decision, Quote, Symbol, cross, decide, sql};

/// One attempt's work on a client.
type Work<'c, T> = Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>;

/// Attempts before the naive loop gives up.
const MAX_ATTEMPTS: u32 = 10;

struct RawClient {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl RawClient {
    async fn statement(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }
}

/// A connection pool as small as a user would write: a stack of idle clients
/// and a semaphore.
struct Pool {
    idle: Mutex<Vec<RawClient>>,
    permits: Semaphore,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl Pool {
    async fn get(
        &self,
    ) -> Result<(RawClient, tokio::sync::SemaphorePermit<'_>), tokio_postgres::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(c) = idle
            && !c.client.is_closed()
        {
            return Ok((c, permit));
        }
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(connection);
        Ok((
            RawClient {
                client,
                prepared: HashMap::new(),
            },
            permit,
        ))
    }

    fn put(&self, c: RawClient) {
        if !c.client.is_closed() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
    }
}

/// The raw client's connection settings, from the same target Railyard uses.
fn client_config(
    target: &ConnectTarget,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), String> {
    let mut pg = tokio_postgres::Config::new();
    let (host, port) = target.hosts().first().ok_or("the target has no host")?;
    match host {
        Host::Tcp(h) => pg.host(h),
        Host::Unix(p) => pg.host_path(p),
        _ => return Err("unsupported host kind".into()),
    };
    pg.port(*port);
    if let Some(u) = target.user() {
        pg.user(u);
    }
    if let Some(p) = target.password() {
        pg.password(p.expose());
    }
    if let Some(d) = target.dbname() {
        pg.dbname(d);
    }
    pg.application_name("railyard-load-raw");
    pg.connect_timeout(Duration::from_secs(5));
    let mut roots = rustls::RootCertStore::empty();
    match target.ssl_root_cert() {
        Some(path) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let pem = std::fs::read(path)
                .map_err(|e| format!("reading sslrootcert {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    pg.ssl_mode(match target.ssl_mode() {
        Some(SslMode::Disable) => tokio_postgres::config::SslMode::Disable,
        Some(SslMode::Prefer) | None => tokio_postgres::config::SslMode::Prefer,
        Some(_) => tokio_postgres::config::SslMode::Require,
    });
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((pg, MakeRustlsConnect::new(tls)))
}

/// The ledger on raw tokio-postgres.
pub struct RawEngine {
    pool: Pool,
    accounts: Vec<i64>,
    last_order: Vec<AtomicI64>,
    symbols: Vec<Symbol>,
    run: String,
}

impl std::fmt::Debug for RawEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawEngine")
            .field("run", &self.run)
            .finish_non_exhaustive()
    }
}

impl RawEngine {
    /// A baseline engine on `target` with `connections` connections.
    pub fn new(
        target: &ConnectTarget,
        connections: usize,
        accounts: &[i64],
        symbols: Vec<Symbol>,
        run: String,
    ) -> Result<Self, String> {
        let (config, tls) = client_config(target)?;
        Ok(RawEngine {
            pool: Pool {
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(connections.max(1)),
                config,
                tls,
            },
            accounts: accounts.to_vec(),
            last_order: accounts.iter().map(|_| AtomicI64::new(0)).collect(),
            symbols,
            run,
        })
    }

    /// The naive loop: run `f` on a pooled client; on a serialization
    /// failure, deadlock or lost connection, roll back and run it again at
    /// once, up to [`MAX_ATTEMPTS`].
    async fn retrying<T>(
        &self,
        mut f: impl for<'c> FnMut(&'c mut RawClient) -> Work<'c, T> + Send,
    ) -> (Result<T, &'static str>, Vec<&'static str>) {
        let mut retries = Vec::new();
        for attempt in 1..=MAX_ATTEMPTS {
            let (mut c, _permit) = match self.pool.get().await {
                Ok(c) => c,
                Err(_) if attempt < MAX_ATTEMPTS => {
                    retries.push(ErrorClass::Reconnect.as_str());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => return (Err(ErrorClass::Reconnect.as_str()), retries),
            };
            match f(&mut c).await {
                Ok(v) => {
                    self.pool.put(c);
                    return (Ok(v), retries);
                }
                Err(e) => {
                    let class = classify(&e, c.client.is_closed());
                    if !c.client.is_closed() {
                        let _ = c.client.batch_execute("ROLLBACK").await;
                    }
                    self.pool.put(c);
                    let again =
                        matches!(class, ErrorClass::RetryTransaction | ErrorClass::Reconnect);
                    if !again || attempt == MAX_ATTEMPTS {
                        return (Err(class.as_str()), retries);
                    }
                    retries.push(class.as_str());
                }
            }
        }
        unreachable!("the loop returns on its last attempt")
    }
}

fn classify(e: &tokio_postgres::Error, closed: bool) -> ErrorClass {
    match e.code() {
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            ErrorClass::RetryTransaction
        }
        Some(c) if c.code().starts_with("23") => ErrorClass::Constraint,
        Some(c) if *c == SqlState::QUERY_CANCELED => ErrorClass::Timeout,
        Some(_) => ErrorClass::Permanent,
        None if closed => ErrorClass::Reconnect,
        None => ErrorClass::Permanent,
    }
}

fn done(
    kind: OpKind,
    started: Instant,
    r: Result<(), &'static str>,
    retries: Vec<&'static str>,
    replica: Option<bool>,
) -> Step {
    Step {
        kind,
        started,
        ended: Instant::now(),
        outcome: Outcome {
            error: r.err(),
            retries,
            replica,
            stale: false,
        },
    }
}

async fn match_raw(
    c: &mut RawClient,
    symbol: &str,
    rebate_pct: i64,
) -> Result<(), tokio_postgres::Error> {
    c.client
        .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        .await?;
    let best = c.statement(sql::BEST).await?;
    let rows = c.client.query(&best, &[&symbol]).await?;
    let quote = |side: &str| {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == side)
            .map(|r| Quote {
                order_id: r.get(1),
                account_id: r.get(2),
                remaining: r.get(3),
                price_cents: r.get(4),
                balance_cents: r.get(5),
            })
    };
    match decide(quote("buy"), quote("sell")) {
        Decision::Nothing => {}
        Decision::PreventSelfTrade(id) | Decision::InsufficientFunds(id) => {
            let s = c.statement(sql::CANCEL_ORDER).await?;
            c.client.execute(&s, &[&id]).await?;
        }
        Decision::Trade { bid, ask } => {
            let x = cross(&bid, &ask);
            let s = c.statement(sql::TRADE).await?;
            let row = c
                .client
                .query_one(
                    &s,
                    &[
                        &bid.order_id,
                        &ask.order_id,
                        &symbol,
                        &x.quantity,
                        &x.price,
                        &bid.account_id,
                        &ask.account_id,
                        &x.fee,
                    ],
                )
                .await?;
            let fee_id: Option<i64> = row.get(1);
            let fee: i64 = row.get(2);
            if rebate_pct > 0
                && let Some(fee_id) = fee_id
            {
                let rebate = (fee * rebate_pct / 100).max(1);
                c.client.batch_execute("SAVEPOINT rebate").await?;
                let fee_stmt = c.statement(sql::REBATE_FEE).await?;
                let cash_stmt = c.statement(sql::REBATE_CASH).await?;
                let granted = match c.client.execute(&fee_stmt, &[&fee_id, &rebate]).await {
                    Ok(_) => c
                        .client
                        .execute(&cash_stmt, &[&bid.account_id, &rebate])
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                };
                match granted {
                    Ok(()) => c.client.batch_execute("RELEASE SAVEPOINT rebate").await?,
                    Err(e) if e.code() == Some(&SqlState::CHECK_VIOLATION) => {
                        c.client
                            .batch_execute("ROLLBACK TO SAVEPOINT rebate")
                            .await?
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    c.client.batch_execute("COMMIT").await
}

impl Engine for RawEngine {
    // Long by design: the raw baseline mirrors the engine's loop line for line, so the two compare.
    async fn run(self: Arc<Self>, op: Planned) -> Vec<Step> {
        let t = op.trader % self.accounts.len();
        let account = self.accounts[t];
        let key = format!("{}-{}", self.run, op.seq);
        let started = Instant::now();
        let kind = op.action.kind();
        match op.action {
            Action::Place {
                symbol,
                side,
                quantity,
                price_offset_bp,
                rebate_pct,
            } => {
                let sym = &self.symbols[symbol % self.symbols.len()];
                let price = sym.limit_price(price_offset_bp);
                let (r, retries) = self
                    .retrying(|c| {
                        let symbol = sym.symbol.clone();
                        let key = key.clone();
                        Box::pin(async move {
                            let s = c.statement(sql::PLACE).await?;
                            let row = c
                                .client
                                .query_one(
                                    &s,
                                    &[&account, &symbol, &side.as_str(), &quantity, &price, &key],
                                )
                                .await?;
                            Ok(row.get::<_, i64>(0))
                        })
                    })
                    .await;
                let mut steps = vec![done(
                    kind,
                    started,
                    r.map(|id| {
                        self.last_order[t].fetch_max(id, Ordering::AcqRel);
                    }),
                    retries,
                    None,
                )];
                if steps[0].outcome.error.is_none() {
                    let started = Instant::now();
                    let (r, retries) = self
                        .retrying(|c| {
                            let symbol = sym.symbol.clone();
                            Box::pin(async move { match_raw(c, &symbol, rebate_pct).await })
                        })
                        .await;
                    steps.push(done(OpKind::Match, started, r, retries, None));
                }
                steps
            }
            Action::Portfolio => {
                let known = self.last_order[t].load(Ordering::Acquire);
                let (r, retries) = self
                    .retrying(|c| {
                        Box::pin(async move {
                            let s = c.statement(sql::PORTFOLIO).await?;
                            let row = c.client.query_one(&s, &[&account]).await?;
                            Ok(row.get::<_, i64>(3))
                        })
                    })
                    .await;
                let stale = matches!(r, Ok(last) if last < known);
                let mut step = done(kind, started, r.map(|_| ()), retries, Some(false));
                step.outcome.stale = stale;
                vec![step]
            }
            Action::Book { symbol } => {
                let sym = &self.symbols[symbol % self.symbols.len()];
                let (r, retries) = self
                    .retrying(|c| {
                        let symbol = sym.symbol.clone();
                        Box::pin(async move {
                            let s = c.statement(sql::BOOK).await?;
                            c.client.query(&s, &[&symbol]).await.map(|_| ())
                        })
                    })
                    .await;
                vec![done(kind, started, r, retries, Some(false))]
            }
            Action::Deposit { amount_cents } => {
                let (r, retries) = self
                    .retrying(|c| {
                        let key = key.clone();
                        Box::pin(async move {
                            let s = c.statement(sql::DEPOSIT).await?;
                            c.client
                                .execute(&s, &[&account, &amount_cents, &key])
                                .await
                                .map(|_| ())
                        })
                    })
                    .await;
                vec![done(kind, started, r, retries, None)]
            }
            Action::Cancel => {
                let (r, retries) = self
                    .retrying(|c| {
                        Box::pin(async move {
                            let s = c.statement(sql::CANCEL_OLDEST).await?;
                            c.client.execute(&s, &[&account]).await.map(|_| ())
                        })
                    })
                    .await;
                vec![done(kind, started, r, retries, None)]
            }
        }
    }
}
