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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

use railyard::database::Database;
use railyard::observe::health::HealthStatus;
use railyard::observe::{CapturedPlan, CostNode, HealthCheck, PlanChange};
use railyard_ops::watch::{PoolSample, ReplicaSample, Sample, TopStatement, Watcher};

/// The page, with its CSS and JS inline.
const PAGE: &str = include_str!("dashboard.html");
/// Where the server writes the verdict into the page (before any script runs).
const VERDICT_MARK: &str = "<!--railyard:verdict-->";
/// Where the server writes the verdict's class.
const CLASS_MARK: &str = "v-railyard-class";
/// Where the server writes the reasons.
const REASONS_MARK: &str = "<!--railyard:reasons-->";

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
/// Reasons written into the page itself at most.
const PAGE_REASONS: usize = 20;
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

/// Samples as one array per series, values rounded.
#[derive(Debug, Default, PartialEq, Serialize)]
pub(crate) struct History {
    pub(crate) at_ms: Vec<u64>,
    /// 0 healthy, 1 degraded, 2 unhealthy.
    pub(crate) status: Vec<u8>,
    pub(crate) qps: Vec<f64>,
    pub(crate) p50: Vec<Option<f64>>,
    pub(crate) p95: Vec<Option<f64>>,
    pub(crate) p99: Vec<Option<f64>>,
    /// Errors per second by class; a class seen in any of the samples has a
    /// value (0 when absent) for each.
    pub(crate) errors: BTreeMap<&'static str, Vec<f64>>,
    /// Retries per second by class, likewise.
    pub(crate) retries: BTreeMap<&'static str, Vec<f64>>,
    /// Each replica's lag in seconds (`null` where it was not listed).
    pub(crate) lag_s: BTreeMap<String, Vec<Option<f64>>>,
}

impl History {
    pub(crate) fn of(samples: &[Arc<Sample>]) -> History {
        let n = samples.len();
        let mut h = History {
            at_ms: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            qps: Vec::with_capacity(n),
            p50: Vec::with_capacity(n),
            p95: Vec::with_capacity(n),
            p99: Vec::with_capacity(n),
            ..History::default()
        };
        for (i, s) in samples.iter().enumerate() {
            h.at_ms.push(s.at_ms);
            h.status.push(match s.status {
                HealthStatus::Healthy => 0,
                HealthStatus::Degraded => 1,
                _ => 2,
            });
            h.qps.push(round(s.queries_per_s, 1));
            h.p50.push(s.p50_ms.map(|v| round(v, 3)));
            h.p95.push(s.p95_ms.map(|v| round(v, 3)));
            h.p99.push(s.p99_ms.map(|v| round(v, 3)));
            for (class, v) in &s.errors_per_s {
                h.errors.entry(class).or_insert_with(|| vec![0.0; n])[i] = round(*v, 2);
            }
            for (class, v) in &s.retries_per_s {
                h.retries.entry(class).or_insert_with(|| vec![0.0; n])[i] = round(*v, 2);
            }
            for r in &s.replicas {
                if h.lag_s.len() >= LAG_SERIES && !h.lag_s.contains_key(&r.name) {
                    continue;
                }
                h.lag_s
                    .entry(r.name.clone())
                    .or_insert_with(|| vec![None; n])[i] = Some(round(r.lag_seconds, 3));
            }
        }
        h
    }
}

/// Top statements with their plans, other plans, plan changes.
#[derive(Debug, Serialize)]
pub(crate) struct StatementsBlock {
    /// When it was gathered (the page sends it back as `stmts`).
    pub(crate) at_ms: u64,
    pub(crate) top: Vec<StatementRow>,
    /// Captured plans of statements not in `top`, slowest first.
    pub(crate) other_plans: Vec<PlanRow>,
    /// Newest first.
    pub(crate) plan_changes: Vec<ChangeRow>,
}

#[derive(Debug, Serialize)]
pub(crate) struct StatementRow {
    pub(crate) statement: String,
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) total_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p95_ms: f64,
    pub(crate) p99_ms: f64,
    /// Its captured plan, when there is one.
    pub(crate) plan: Option<PlanRow>,
}

#[derive(Debug, Serialize)]
pub(crate) struct PlanRow {
    pub(crate) statement: String,
    /// Node types, depth first, at most [`PLAN_NODES`].
    pub(crate) nodes: Vec<String>,
    /// Nodes not listed.
    pub(crate) more_nodes: usize,
    pub(crate) total_cost: f64,
    pub(crate) plan_rows: f64,
    /// The three costliest nodes.
    pub(crate) top: Vec<CostNode>,
    /// The execution that triggered the capture, ms.
    pub(crate) duration_ms: f64,
    /// Seconds since it was captured.
    pub(crate) age_s: u64,
    /// Its statement's plan changed for the worse recently.
    pub(crate) changed: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChangeRow {
    pub(crate) statement: String,
    pub(crate) before: Vec<String>,
    pub(crate) after: Vec<String>,
    pub(crate) before_ms: f64,
    pub(crate) after_ms: f64,
    /// Seconds since it was seen.
    pub(crate) age_s: u64,
}

impl StatementsBlock {
    pub(crate) fn of(
        top: Vec<TopStatement>,
        mut plans: Vec<CapturedPlan>,
        changes: Vec<PlanChange>,
        at_ms: u64,
    ) -> StatementsBlock {
        let changed = |statement: &str| changes.iter().any(|c| c.statement == statement);
        let plan_row = |p: CapturedPlan| PlanRow {
            changed: changed(&p.statement),
            more_nodes: p.nodes.len().saturating_sub(PLAN_NODES),
            nodes: p
                .nodes
                .into_iter()
                .take(PLAN_NODES)
                .map(|n| cut(&n, 60))
                .collect(),
            total_cost: round(p.total_cost, 2),
            plan_rows: round(p.plan_rows, 0),
            top: p
                .top
                .into_iter()
                .take(3)
                .map(|n| CostNode {
                    node_type: cut(&n.node_type, 60),
                    relation: n.relation.map(|r| cut(&r, 128)),
                    self_cost: round(n.self_cost, 2),
                    plan_rows: round(n.plan_rows, 0),
                })
                .collect(),
            duration_ms: round(p.duration_ms, 3),
            age_s: p.captured_at.elapsed().as_secs(),
            statement: cut(&p.statement, STATEMENT_CHARS),
        };
        let top: Vec<StatementRow> = top
            .into_iter()
            .take(TOP_STATEMENTS)
            .map(|s| {
                let plan = plans
                    .iter()
                    .position(|p| p.statement == s.statement)
                    .map(|i| plan_row(plans.swap_remove(i)));
                StatementRow {
                    statement: cut(&s.statement, STATEMENT_CHARS),
                    calls: s.calls,
                    errors: s.errors,
                    total_ms: round(s.total_ms, 1),
                    p50_ms: round(s.p50_ms, 3),
                    p95_ms: round(s.p95_ms, 3),
                    p99_ms: round(s.p99_ms, 3),
                    plan,
                }
            })
            .collect();
        plans.sort_by(|a, b| b.duration_ms.total_cmp(&a.duration_ms));
        let other_plans = plans.into_iter().take(OTHER_PLANS).map(plan_row).collect();
        let nodes = |v: &[String]| -> Vec<String> {
            v.iter().take(PLAN_NODES).map(|n| cut(n, 60)).collect()
        };
        let plan_changes = changes
            .iter()
            .rev()
            .take(PLAN_CHANGES)
            .map(|c| ChangeRow {
                statement: cut(&c.statement, STATEMENT_CHARS),
                before: nodes(&c.before),
                after: nodes(&c.after),
                before_ms: round(c.before_ms, 3),
                after_ms: round(c.after_ms, 3),
                age_s: c.seen_at.elapsed().as_secs(),
            })
            .collect();
        StatementsBlock {
            at_ms,
            top,
            other_plans,
            plan_changes,
        }
    }
}

/// The page with the verdict and its reasons written in, so that what is
/// wrong shows before (and without) the script.
pub(crate) fn render_page(latest: Option<&Sample>) -> String {
    let (verdict, class) = match latest.map(|s| s.status) {
        None => ("waiting", "v-unknown"),
        Some(HealthStatus::Healthy) => ("healthy", "v-healthy"),
        Some(HealthStatus::Degraded) => ("degraded", "v-degraded"),
        Some(_) => ("unhealthy", "v-unhealthy"),
    };
    let mut reasons = String::new();
    match latest {
        None => reasons.push_str("<li class=\"muted\">waiting for the first sample</li>"),
        Some(s) if s.reasons.is_empty() => {
            reasons.push_str("<li class=\"muted\">nothing: every check is healthy</li>");
        }
        Some(s) => {
            for r in s.reasons.iter().take(PAGE_REASONS) {
                let status = match r.status {
                    HealthStatus::Healthy => "healthy",
                    HealthStatus::Degraded => "degraded",
                    _ => "unhealthy",
                };
                reasons.push_str(&format!(
                    "<li class=\"s-{status}\"><b>{}</b> {}</li>",
                    escape_html(&r.name),
                    escape_html(&r.reason)
                ));
            }
        }
    }
    PAGE.replacen(VERDICT_MARK, verdict, 1)
        .replacen(CLASS_MARK, class, 1)
        .replacen(REASONS_MARK, &reasons, 1)
}

/// Text made safe inside an element or a quoted attribute.
pub(crate) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
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

    fn sample(at_ms: u64, i: usize) -> Arc<Sample> {
        let mut errors = BTreeMap::new();
        if i.is_multiple_of(3) {
            errors.insert("timeout", 1.0 / 3.0);
        }
        let mut retries = BTreeMap::new();
        if i == 5 {
            retries.insert("retry_transaction", 2.123456);
        }
        let mut s = Sample::default();
        s.at_ms = at_ms;
        s.status = if i == 4 {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        s.primary_up = true;
        s.pools = vec![pool()];
        s.replicas = (0..(i % 2 + 1))
            .map(|r| replica(format!("replica-{r}"), "healthy", 100, 0.123456, false, 0))
            .collect();
        s.queries_per_s = 123.456;
        s.p50_ms = (i != 2).then_some(1.23456);
        s.p95_ms = Some(4.5);
        s.p99_ms = Some(9.87654321);
        s.errors_per_s = errors;
        s.retries_per_s = retries;
        Arc::new(s)
    }

    #[test]
    fn history_is_one_array_per_series_rounded_with_gaps_filled() {
        let samples: Vec<_> = (0..6).map(|i| sample(1_000 + i as u64 * 1000, i)).collect();
        let h = History::of(&samples);
        assert_eq!(h.at_ms, vec![1000, 2000, 3000, 4000, 5000, 6000]);
        assert_eq!(h.status, vec![0, 0, 0, 0, 1, 0]);
        assert_eq!(h.qps, vec![123.5; 6]);
        assert_eq!(h.p50[1], Some(1.235));
        assert_eq!(h.p50[2], None);
        assert_eq!(h.p99[0], Some(9.877));
        assert_eq!(h.errors["timeout"], vec![0.33, 0.0, 0.0, 0.33, 0.0, 0.0]);
        assert_eq!(
            h.retries["retry_transaction"],
            vec![0.0, 0.0, 0.0, 0.0, 0.0, 2.12]
        );
        // replica-1 appears only in odd samples; null elsewhere.
        assert_eq!(h.lag_s["replica-0"], vec![Some(0.123); 6]);
        assert_eq!(
            h.lag_s["replica-1"],
            vec![None, Some(0.123), None, Some(0.123), None, Some(0.123)]
        );
        // Compact: far smaller than the samples themselves.
        let compact = serde_json::to_string(&h).unwrap();
        let full =
            serde_json::to_string(&samples.iter().map(|s| &**s).collect::<Vec<_>>()).unwrap();
        eprintln!(
            "6 samples: {} bytes compact, {} as objects",
            compact.len(),
            full.len()
        );
        assert!(
            compact.len() * 3 < full.len(),
            "{compact} vs {}",
            full.len()
        );
        let empty = serde_json::to_string(&History::of(&[])).unwrap();
        assert_eq!(
            empty,
            r#"{"at_ms":[],"status":[],"qps":[],"p50":[],"p95":[],"p99":[],"errors":{},"retries":{},"lag_s":{}}"#
        );
    }

    #[test]
    fn one_new_sample_is_a_few_hundred_bytes() {
        let h = History::of(&[sample(1_700_000_000_000, 3)]);
        let n = serde_json::to_string(&h).unwrap().len();
        assert!(n < 300, "{n}");
    }

    #[test]
    fn lag_series_are_bounded() {
        let mut s = (*sample(1, 0)).clone();
        s.replicas = (0..100)
            .map(|r| replica(format!("r{r}"), "down", 0, 0.0, true, 1))
            .collect();
        let h = History::of(&[Arc::new(s)]);
        assert_eq!(h.lag_s.len(), LAG_SERIES);
    }

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

    fn top(i: usize) -> TopStatement {
        let mut t = TopStatement::default();
        t.statement = format!("SELECT * FROM t{i} WHERE a < $1 AND b = '?'");
        t.calls = 10;
        t.total_ms = 100.0 - i as f64;
        t.p50_ms = 1.0;
        t.p95_ms = 2.0;
        t.p99_ms = 3.0;
        t
    }

    fn pool() -> PoolSample {
        let mut p = PoolSample::default();
        p.name = "primary".into();
        p.route = "primary";
        p.open = 4;
        p.idle = 3;
        p.in_use = 1;
        p.max = 16;
        p
    }

    fn replica(
        name: String,
        state: &'static str,
        lag_bytes: u64,
        lag_seconds: f64,
        ejected: bool,
        ejections: u64,
    ) -> ReplicaSample {
        let mut r = ReplicaSample::default();
        r.name = name;
        r.state = state;
        r.lag_bytes = lag_bytes;
        r.lag_seconds = lag_seconds;
        r.ejected = ejected;
        r.ejections = ejections;
        r
    }

    fn plan(statement: &str, nodes: usize, duration_ms: f64) -> CapturedPlan {
        CapturedPlan {
            statement: statement.into(),
            fingerprint: 1,
            nodes: (0..nodes).map(|i| format!("Node {i}")).collect(),
            total_cost: 12.345678,
            plan_rows: 10.4,
            top: (0..5)
                .map(|i| CostNode {
                    node_type: "Seq Scan".into(),
                    relation: Some(format!("t{i}")),
                    self_cost: 1.0,
                    plan_rows: 1.0,
                })
                .collect(),
            plan: serde_json::json!([{"Plan": {}}]),
            duration_ms,
            captured_at: Instant::now(),
        }
    }

    #[test]
    fn statements_plans_and_changes_are_bounded_and_matched() {
        let tops: Vec<_> = (0..30).map(top).collect();
        let mut plans = vec![plan(&tops[1].statement, 40, 5.0)];
        plans.extend((0..20).map(|i| plan(&format!("SELECT {i}"), 2, i as f64)));
        let changes: Vec<_> = (0..30)
            .map(|i| PlanChange {
                statement: if i == 29 {
                    tops[1].statement.clone()
                } else {
                    format!("x{i}")
                },
                before: vec!["Index Scan".into(); 40],
                after: vec!["Seq Scan".into()],
                before_ms: 1.0,
                after_ms: 3.0,
                seen_at: Instant::now(),
            })
            .collect();
        let b = StatementsBlock::of(tops, plans, changes, 7);
        assert_eq!(b.top.len(), TOP_STATEMENTS);
        let p = b.top[1].plan.as_ref().expect("matched by shape");
        assert_eq!((p.nodes.len(), p.more_nodes), (PLAN_NODES, 40 - PLAN_NODES));
        assert_eq!(p.top.len(), 3);
        assert_eq!(p.total_cost, 12.35);
        assert!(p.changed);
        assert!(b.top[0].plan.is_none());
        assert_eq!(b.other_plans.len(), OTHER_PLANS);
        assert_eq!(b.other_plans[0].statement, "SELECT 19");
        assert_eq!(b.plan_changes.len(), PLAN_CHANGES);
        assert_eq!(b.plan_changes[0].statement, b.top[1].statement);
        assert_eq!(b.plan_changes[0].before.len(), PLAN_NODES);
        let json = serde_json::to_string(&b).unwrap();
        assert!(!json.contains("\"Plan\""), "no JSON plan is sent");
        assert!(json.len() < 16_000, "{}", json.len());
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

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            escape_html(r#"a < b && c > 'd' "e""#),
            "a &lt; b &amp;&amp; c &gt; &#39;d&#39; &quot;e&quot;"
        );
        assert_eq!(
            escape_html("<script>alert(1)</script>"),
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
        assert_eq!(escape_html("plain ü"), "plain ü");
    }

    #[test]
    fn the_page_carries_the_verdict_and_escaped_reasons() {
        let waiting = render_page(None);
        assert!(waiting.contains(r#"id="verdict" class="v-unknown">waiting<"#));
        let mut s = (*sample(1, 0)).clone();
        s.status = HealthStatus::Degraded;
        s.reasons = vec![HealthCheck::new(
            "plans",
            HealthStatus::Degraded,
            "SELECT * FROM t WHERE a < $1 AND b = '?'</li><script>",
        )];
        let page = render_page(Some(&s));
        assert!(page.contains(r#"id="verdict" class="v-degraded">degraded<"#));
        assert!(page.contains("a &lt; $1 AND b = &#39;?&#39;&lt;/li&gt;&lt;script&gt;"));
        assert!(!page.contains("<!--railyard:"));
        assert!(!page.contains(CLASS_MARK));
    }

    #[test]
    fn the_page_is_self_contained_and_small() {
        assert!(PAGE.len() < 30 * 1024, "{} bytes", PAGE.len());
        for needle in [
            "http://",
            "https://",
            "<script src",
            "<link",
            "@import",
            "url(",
        ] {
            assert!(!PAGE.contains(needle), "the page holds {needle}");
        }
        for id in [
            "id=\"verdict\"",
            "id=\"reasons\"",
            "id=\"alerts\"",
            "id=\"replicas\"",
            "id=\"pools\"",
            "id=\"charts\"",
            "id=\"statements\"",
            "id=\"migrations\"",
        ] {
            assert!(PAGE.contains(id), "{id}");
        }
        for mark in [VERDICT_MARK, CLASS_MARK, REASONS_MARK] {
            assert_eq!(PAGE.matches(mark).count(), 1, "{mark}");
        }
    }
}
