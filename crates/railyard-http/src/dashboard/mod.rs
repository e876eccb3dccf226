//! The live dashboard: `GET /`, one self-contained page (`dashboard.html`,
//! compiled in), and `GET /dashboard/data`, what it polls every second.
//!
//! The page asks for `?since=AT_MS` (the newest sample it has) and
//! `&stmts=AT_MS` (the statements block it has), so a steady poll carries the
//! latest sample, one history point and no statements: a few hundred bytes.
//! The history is sent as one array per series (not one object per sample),
//! numbers rounded, and bounded by [`WINDOW`] and [`MAX_POINTS`]. Top
//! statements, plans and plan changes are gathered at most every
//! [`STATEMENTS_EVERY`] whatever the number of pages open, and each list is
//! bounded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

use railyard::database::Database;
use railyard::observe::HealthCheck;
use railyard::observe::HealthStatus;
use railyard_ops::watch::{PoolSample, ReplicaSample, Sample, Watcher};

#[cfg(test)]
mod fixtures;
mod history;
mod page;
mod statements;

use history::History;
use page::render_page;
use statements::StatementsBlock;

/// The history the page draws: the last fifteen minutes.
pub(crate) const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Samples in one answer at most (a watcher sampling faster than once a
/// second keeps the newest).
pub(crate) const MAX_POINTS: usize = 900;
/// Top statements shown.
pub(crate) const TOP_STATEMENTS: usize = 10;
/// Captured plans of statements outside the top shown at most.
pub(crate) const OTHER_PLANS: usize = 5;
/// Plan changes shown at most (the newest).
pub(crate) const PLAN_CHANGES: usize = 10;
/// Plan nodes listed at most per plan.
pub(crate) const PLAN_NODES: usize = 16;
/// A statement's shape is cut after this many characters.
pub(crate) const STATEMENT_CHARS: usize = 600;
/// Replicas with a lag series at most.
pub(crate) const LAG_SERIES: usize = 16;
/// Statements, plans and changes are gathered at most this often.
pub(crate) const STATEMENTS_EVERY: Duration = Duration::from_secs(5);

/// The statements block and when it was gathered.
type CachedBlock = Arc<Mutex<Option<(Instant, Arc<StatementsBlock>)>>>;

/// The latest index advice (JSON) and when it was made.
type CachedAdvice = Arc<tokio::sync::Mutex<Option<(Instant, Arc<String>)>>>;

/// Index advice is made at most this often: it explains up to a few hundred
/// statements on a connection of its own.
pub(crate) const ADVICE_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Dash {
    db: Database,
    watcher: Watcher,
    statements: CachedBlock,
    advice: CachedAdvice,
}

/// The dashboard's routes.
pub(super) fn routes(db: Database, watcher: Watcher) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/dashboard/data", get(data))
        .route("/dashboard/advice", get(advice))
        .with_state(Dash {
            db,
            watcher,
            statements: Arc::new(Mutex::new(None)),
            advice: Arc::default(),
        })
}

/// Index advice (see `railyard_ops::advise`), made on request at most once a
/// minute; concurrent requests wait for the one being made.
async fn advice(State(d): State<Dash>) -> impl IntoResponse {
    let mut cached = d.advice.lock().await;
    if let Some((at, json)) = cached.as_ref()
        && at.elapsed() < ADVICE_EVERY
    {
        return (
            axum::http::StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json.to_string(),
        );
    }
    let mut advisor = railyard_ops::advise::Advisor::new(&d.db);
    if let Some(stats) = d.watcher.statements() {
        advisor = advisor.statements(stats);
    }
    match advisor.run().await {
        Ok(a) => {
            let json = Arc::new(a.to_json());
            *cached = Some((Instant::now(), json.clone()));
            (
                axum::http::StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json.to_string(),
            )
        }
        Err(e) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "error": railyard::observe::statement_shape(&e.to_string()) })
                .to_string(),
        ),
    }
}

async fn page(State(d): State<Dash>) -> impl IntoResponse {
    let latest = d.watcher.since(0, 1).pop();
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        render_page(latest.as_deref()),
    )
}

async fn data(State(d): State<Dash>, RawQuery(query): RawQuery) -> impl IntoResponse {
    let q = DataQuery::parse(query.as_deref());
    let samples = d.watcher.since(q.since.max(window_start()), MAX_POINTS);
    let latest = match samples.last() {
        Some(s) => Some(s.clone()),
        None => d.watcher.since(0, 1).pop(),
    };
    let block = d.statements_block();
    let body = Data {
        now_ms: now_ms(),
        every_ms: d.watcher.every().as_millis() as u64,
        window_ms: WINDOW.as_millis() as u64,
        latest: latest.as_deref().map(Latest::of),
        history: History::of(&samples),
        statements: (q.stmts != Some(block.at_ms)).then_some(&*block),
    };
    let json = serde_json::to_string(&body).unwrap_or_else(|_| "{}".into());
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json,
    )
}

impl Dash {
    /// The statements block, gathered again when older than [`STATEMENTS_EVERY`].
    fn statements_block(&self) -> Arc<StatementsBlock> {
        let mut cached = self.statements.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((taken, block)) = &*cached
            && taken.elapsed() < STATEMENTS_EVERY
        {
            return block.clone();
        }
        let block = Arc::new(StatementsBlock::of(
            self.watcher.top_statements(TOP_STATEMENTS),
            self.db.plans(),
            self.db.plan_changes(),
            now_ms(),
        ));
        *cached = Some((Instant::now(), block.clone()));
        block
    }
}

/// `?since=AT_MS&stmts=AT_MS`; anything else is ignored.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct DataQuery {
    /// The newest sample the page has.
    pub(crate) since: u64,
    /// The statements block the page has.
    pub(crate) stmts: Option<u64>,
}

impl DataQuery {
    pub(crate) fn parse(query: Option<&str>) -> Self {
        let mut q = DataQuery::default();
        for pair in query.unwrap_or("").split('&').take(16) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match (k, v.parse::<u64>()) {
                ("since", Ok(n)) => q.since = n,
                ("stmts", Ok(n)) => q.stmts = Some(n),
                _ => {}
            }
        }
        q
    }
}

#[derive(Serialize)]
struct Data<'a> {
    now_ms: u64,
    every_ms: u64,
    window_ms: u64,
    /// `null` before the first sample.
    latest: Option<Latest<'a>>,
    history: History,
    /// `null` when the page has this block already.
    statements: Option<&'a StatementsBlock>,
}

/// The newest sample without its rates (the history carries them).
#[derive(Serialize)]
struct Latest<'a> {
    at_ms: u64,
    status: HealthStatus,
    reasons: &'a [HealthCheck],
    primary_up: bool,
    migrations: Option<&'a HealthCheck>,
    pools: &'a [PoolSample],
    replicas: &'a [ReplicaSample],
}

impl<'a> Latest<'a> {
    fn of(s: &'a Sample) -> Self {
        Latest {
            at_ms: s.at_ms,
            status: s.status,
            reasons: &s.reasons,
            primary_up: s.primary_up,
            migrations: s.migrations.as_ref(),
            pools: &s.pools,
            replicas: &s.replicas,
        }
    }
}

/// At most `max` characters of `text`, with `…` when cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((i, _)) => format!("{}…", &text[..i]),
    }
}

/// `x` with `digits` decimals (0 for what is not finite).
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    if !x.is_finite() {
        return 0.0;
    }
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The oldest sample time the page draws.
fn window_start() -> u64 {
    now_ms().saturating_sub(WINDOW.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_read_leniently() {
        assert_eq!(DataQuery::parse(None), DataQuery::default());
        assert_eq!(
            DataQuery::parse(Some("since=17&stmts=42")),
            DataQuery {
                since: 17,
                stmts: Some(42)
            }
        );
        assert_eq!(
            DataQuery::parse(Some("since=-1&x=y&stmts=&&since")),
            DataQuery::default()
        );
    }

    #[test]
    fn long_statements_are_cut_on_a_character() {
        let long = "é".repeat(STATEMENT_CHARS + 10);
        let c = cut(&long, STATEMENT_CHARS);
        assert_eq!(c.chars().count(), STATEMENT_CHARS + 1);
        assert!(c.ends_with('…'));
        assert_eq!(cut("short", 10), "short");
    }

    #[test]
    fn rounding_keeps_json_short_and_finite() {
        assert_eq!(round(1.0 / 3.0, 2), 0.33);
        assert_eq!(round(f64::NAN, 2), 0.0);
        assert_eq!(round(f64::INFINITY, 2), 0.0);
    }
}
