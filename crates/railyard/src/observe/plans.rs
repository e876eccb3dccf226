//! Plans of slow statements, captured off the request path.
//!
//! When a statement runs longer than the capture threshold, its text (string
//! literals already replaced by `'?'`, which keeps it valid SQL) is offered to
//! a bounded queue; a task on one dedicated connection explains it and keeps
//! the newest plan per statement shape. The caller never waits: a full queue,
//! a shape explained within the last minute, or a spent rate budget drop the
//! offer.
//!
//! How: `EXPLAIN (FORMAT JSON)` of a generic form. A statement with bind
//! parameters is prepared (`PREPARE`, which infers their types) and explained
//! as `EXECUTE` with `NULL` for each, under `plan_cache_mode =
//! force_generic_plan`, so the plan is the one for any value. It needs no
//! superuser and no server setting, so it works on any server; `auto_explain`
//! would give actual row counts but needs `shared_preload_libraries` or
//! superuser `LOAD`. The statement is never executed: estimated rows only.
//! Every string in the plan (filter and index conditions print constants) is
//! normalised before it is stored: constants become `?`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::conn::open::Opener;

/// How many plans are kept (the newest per statement shape).
pub const MAX_PLANS: usize = 256;
/// Offers waiting to be explained at most.
const QUEUE: usize = 64;
/// A shape is explained at most once in this window.
const AGAIN_AFTER: Duration = Duration::from_secs(60);

/// Settings of plan capture.
///
/// ```
/// use std::time::Duration;
/// let p = railyard::observe::PlanCapture::slower_than(Duration::from_millis(200));
/// assert_eq!(p.threshold(), Duration::from_millis(200));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanCapture {
    threshold: Duration,
    per_minute: u32,
    again_after: Duration,
    slowdown: f64,
}

impl PlanCapture {
    /// Captures plans of statements slower than `threshold`, at most 30 a
    /// minute.
    pub fn slower_than(threshold: Duration) -> Self {
        PlanCapture {
            threshold,
            per_minute: 30,
            again_after: AGAIN_AFTER,
            slowdown: 2.0,
        }
    }

    /// Explains a statement shape again at most this often (default 60 s).
    #[must_use]
    pub fn again_after(mut self, d: Duration) -> Self {
        self.again_after = d;
        self
    }

    /// A plan change is reported when the statement runs this many times
    /// slower under its new plan than under its old one (default 2.0), by a
    /// moving average of the executions whose plans were captured; once per
    /// change of plan.
    #[must_use]
    pub fn plan_change_slowdown(mut self, factor: f64) -> Self {
        self.slowdown = if factor.is_finite() {
            factor.max(1.0)
        } else {
            2.0
        };
        self
    }

    /// At most `n` plans explained per minute (at least 1).
    #[must_use]
    pub fn per_minute(mut self, n: u32) -> Self {
        self.per_minute = n.max(1);
        self
    }

    /// The threshold.
    pub fn threshold(&self) -> Duration {
        self.threshold
    }
}

/// One node of a captured plan, by its own cost (its total minus its children's).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct CostNode {
    /// `Seq Scan`, `Index Scan`, `Hash Join`, …
    pub node_type: String,
    /// The relation it reads, when it reads one.
    pub relation: Option<String>,
    /// Its own estimated cost.
    pub self_cost: f64,
    /// Rows it is estimated to return.
    pub plan_rows: f64,
}

/// The newest plan of one statement shape.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct CapturedPlan {
    /// The statement's shape (constants replaced by `?`).
    pub statement: String,
    /// A hash of the plan's structure (node types, relations, indexes):
    /// equal fingerprints, same plan shape.
    pub fingerprint: u64,
    /// The node types, depth first.
    pub nodes: Vec<String>,
    /// The root's estimated total cost.
    pub total_cost: f64,
    /// The root's estimated rows.
    pub plan_rows: f64,
    /// The three costliest nodes by their own cost.
    pub top: Vec<CostNode>,
    /// The plan as `EXPLAIN (FORMAT JSON)` gave it, every string normalised.
    pub plan: serde_json::Value,
    /// How long the execution that triggered the capture took, ms.
    pub duration_ms: f64,
    /// When it was captured.
    #[serde(skip)]
    pub captured_at: Instant,
}

/// A statement whose plan changed and which got slower with it (the "slow
/// after ANALYZE", or after an index was dropped, case).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PlanChange {
    /// The statement's shape.
    pub statement: String,
    /// The old plan's node types.
    pub before: Vec<String>,
    /// The new plan's node types.
    pub after: Vec<String>,
    /// The moving average of executions under the old plan, ms.
    pub before_ms: f64,
    /// The moving average under the new plan when the change was reported, ms.
    pub after_ms: f64,
    /// When it was seen.
    #[serde(skip)]
    pub seen_at: Instant,
}

impl CapturedPlan {
    /// A plan of `statement` with nothing in it, captured now: for tests of
    /// what shows plans (the dashboard's).
    #[doc(hidden)]
    pub fn empty(statement: impl Into<String>) -> Self {
        CapturedPlan {
            statement: statement.into(),
            fingerprint: 0,
            nodes: Vec::new(),
            total_cost: 0.0,
            plan_rows: 0.0,
            top: Vec::new(),
            plan: serde_json::Value::Null,
            duration_ms: 0.0,
            captured_at: Instant::now(),
        }
    }
}

impl PlanChange {
    /// A change of `statement`'s plan with nothing in it, seen now: for tests.
    #[doc(hidden)]
    pub fn empty(statement: impl Into<String>) -> Self {
        PlanChange {
            statement: statement.into(),
            before: Vec::new(),
            after: Vec::new(),
            before_ms: 0.0,
            after_ms: 0.0,
            seen_at: Instant::now(),
        }
    }
}

/// A function called with each plan change, on the capture task (never on
/// the request path); see `DatabaseBuilder::on_plan_change`.
#[derive(Clone)]
pub(crate) struct ChangeHook(pub(crate) std::sync::Arc<dyn Fn(&PlanChange) + Send + Sync>);

impl std::fmt::Debug for ChangeHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeHook")
    }
}

/// How many plan changes are kept.
pub const MAX_PLAN_CHANGES: usize = 64;

/// Where offers go and plans are kept; shared by the connections and the task.
#[derive(Debug)]
pub(crate) struct PlanStore {
    pub(crate) settings: PlanCapture,
    on_change: Option<ChangeHook>,
    queue: tokio::sync::mpsc::Sender<(String, Duration)>,
    state: Mutex<State>,
}

/// A shape's latency under its current plan, against the plan before.
///
/// Latency is a moving average (each capture weighs one half) of the
/// executions that triggered captures. An execution is explained after it
/// ran, so the first capture under a new plan may time an execution of the
/// old one; the average lets the next few decide.
#[derive(Debug)]
struct Trend {
    fingerprint: u64,
    ms: f64,
    /// The plan before: its nodes and its average, until a change is reported.
    before: Option<(Vec<String>, f64)>,
}

#[derive(Debug, Default)]
struct State {
    plans: HashMap<String, CapturedPlan>,
    /// Latency under each shape's plan, and under the plan before it (the
    /// same keys as `plans`).
    trends: HashMap<String, Trend>,
    order: VecDeque<String>,
    recent: HashMap<String, Instant>,
    spent: (Option<Instant>, u32),
    changes: VecDeque<PlanChange>,
}

impl PlanStore {
    /// A store and the receiving end of its queue.
    pub(crate) fn new(
        settings: PlanCapture,
        on_change: Option<ChangeHook>,
    ) -> (Self, tokio::sync::mpsc::Receiver<(String, Duration)>) {
        let (queue, rx) = tokio::sync::mpsc::channel(QUEUE);
        (
            PlanStore {
                settings,
                on_change,
                queue,
                state: Mutex::new(State::default()),
            },
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers a slow statement (literals already replaced); never waits.
    pub(crate) fn offer(&self, sql: &str, shape: &str, took: Duration) {
        let now = Instant::now();
        {
            let mut s = self.lock();
            let again = self.settings.again_after;
            if s.recent.get(shape).is_some_and(|t| now - *t < again) {
                return;
            }
            let window = s.spent.0.is_some_and(|t| now - t < Duration::from_secs(60));
            if !window {
                s.spent = (Some(now), 0);
            }
            if s.spent.1 >= self.settings.per_minute {
                return;
            }
            s.spent.1 += 1;
            if s.recent.len() >= 4 * MAX_PLANS {
                s.recent.retain(|_, t| now - *t < again);
                if s.recent.len() >= 4 * MAX_PLANS {
                    return;
                }
            }
            s.recent.insert(shape.to_owned(), now);
        }
        let _ = self.queue.try_send((sql.to_owned(), took));
    }

    fn keep(&self, plan: CapturedPlan) {
        let mut s = self.lock();
        let key = plan.statement.clone();
        let old_nodes = s.plans.get(&key).map(|p| p.nodes.clone());
        let d = plan.duration_ms;
        let trend = s.trends.entry(key.clone()).or_insert(Trend {
            fingerprint: plan.fingerprint,
            ms: d,
            before: None,
        });
        if trend.fingerprint == plan.fingerprint {
            trend.ms = (trend.ms + d) / 2.0;
        } else {
            trend.before = old_nodes.map(|nodes| (nodes, trend.ms));
            trend.fingerprint = plan.fingerprint;
            trend.ms = d;
        }
        let change = match &trend.before {
            Some((nodes, before_ms)) if trend.ms >= before_ms * self.settings.slowdown => {
                Some(PlanChange {
                    statement: key.clone(),
                    before: nodes.clone(),
                    after: plan.nodes.clone(),
                    before_ms: *before_ms,
                    after_ms: trend.ms,
                    seen_at: Instant::now(),
                })
            }
            _ => None,
        };
        if change.is_some() {
            trend.before = None;
        }
        if s.plans.insert(key.clone(), plan).is_none() {
            s.order.push_back(key);
            while s.order.len() > MAX_PLANS {
                if let Some(old) = s.order.pop_front() {
                    s.plans.remove(&old);
                    s.trends.remove(&old);
                }
            }
        }
        let Some(change) = change else { return };
        tracing::warn!(
            target: "railyard::plans",
            statement = %change.statement,
            before = ?change.before,
            after = ?change.after,
            before_ms = change.before_ms,
            after_ms = change.after_ms,
            "a statement's plan changed and it got slower"
        );
        if s.changes.len() >= MAX_PLAN_CHANGES {
            s.changes.pop_front();
        }
        s.changes.push_back(change.clone());
        // Outside the lock: the hook may read the store.
        drop(s);
        if let Some(hook) = &self.on_change {
            (hook.0)(&change);
        }
    }

    /// The plan changes seen, oldest first.
    pub(crate) fn changes(&self) -> Vec<PlanChange> {
        self.lock().changes.iter().cloned().collect()
    }

    /// The plans kept, newest first.
    pub(crate) fn plans(&self) -> Vec<CapturedPlan> {
        let mut v: Vec<CapturedPlan> = self.lock().plans.values().cloned().collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.captured_at));
        v
    }
}

/// The highest `$n` placeholder outside literals (`sql` has its literals
/// replaced already), 0 when there is none.
fn parameters(sql: &str) -> usize {
    let b = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() && b[i + 1].is_ascii_digit() {
            let start = i + 1;
            let mut j = start;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if let Ok(n) = sql[start..j].parse::<usize>() {
                max = max.max(n);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    max
}

/// Replaces constants in every string of the plan.
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => {
            let mut out = String::with_capacity(s.len());
            super::stats::normalize_into(s, &mut out);
            *s = out;
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        serde_json::Value::Object(o) => o.values_mut().for_each(redact),
        _ => {}
    }
}

fn text(node: &serde_json::Value, key: &str) -> Option<String> {
    node.get(key).and_then(|v| v.as_str()).map(str::to_owned)
}

fn number(node: &serde_json::Value, key: &str) -> f64 {
    node.get(key)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0)
}

fn walk(
    node: &serde_json::Value,
    nodes: &mut Vec<String>,
    costs: &mut Vec<CostNode>,
    hasher: &mut impl std::hash::Hasher,
) {
    use std::hash::Hash;
    let kind = text(node, "Node Type").unwrap_or_default();
    let relation = text(node, "Relation Name");
    (
        kind.as_str(),
        relation.as_deref(),
        text(node, "Index Name").as_deref(),
    )
        .hash(hasher);
    let children = node.get("Plans").and_then(|p| p.as_array());
    let child_cost: f64 = children
        .map(|c| c.iter().map(|n| number(n, "Total Cost")).sum())
        .unwrap_or(0.0);
    costs.push(CostNode {
        node_type: kind.clone(),
        relation,
        self_cost: (number(node, "Total Cost") - child_cost).max(0.0),
        plan_rows: number(node, "Plan Rows"),
    });
    nodes.push(kind);
    for c in children.into_iter().flatten() {
        walk(c, nodes, costs, hasher);
    }
    // Where a subtree ends, so that shapes with the same nodes differ.
    0u8.hash(hasher);
}

/// Summarises `EXPLAIN (FORMAT JSON)` output for `statement`.
pub(crate) fn summarise(statement: String, json: &str, took: Duration) -> Option<CapturedPlan> {
    let mut value: serde_json::Value = serde_json::from_str(json).ok()?;
    redact(&mut value);
    let root = value.get(0)?.get("Plan")?.clone();
    let (mut nodes, mut costs) = (Vec::new(), Vec::new());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    walk(&root, &mut nodes, &mut costs, &mut hasher);
    costs.sort_by(|a, b| b.self_cost.total_cmp(&a.self_cost));
    costs.truncate(3);
    Some(CapturedPlan {
        statement,
        fingerprint: std::hash::Hasher::finish(&hasher),
        nodes,
        total_cost: number(&root, "Total Cost"),
        plan_rows: number(&root, "Plan Rows"),
        top: costs,
        plan: value,
        duration_ms: took.as_secs_f64() * 1000.0,
        captured_at: Instant::now(),
    })
}

/// Explains one statement on `conn` in a read-only transaction that is
/// rolled back, in one round trip; the tap keeps the plan's row.
pub async fn explain(conn: &mut crate::conn::Conn, sql: &str) -> Result<String, String> {
    let n = parameters(sql);
    let script = if n == 0 {
        format!("BEGIN READ ONLY; EXPLAIN (FORMAT JSON) {sql}; ROLLBACK")
    } else {
        format!(
            "BEGIN READ ONLY; SET LOCAL plan_cache_mode = force_generic_plan; \
             PREPARE railyard_plan AS {sql}; \
             EXPLAIN (FORMAT JSON) EXECUTE railyard_plan({}); \
             DEALLOCATE railyard_plan; ROLLBACK",
            vec!["NULL"; n].join(", ")
        )
    };
    let (result, captured) = conn
        .simple_query_captured(&script)
        .await
        .map_err(|e| e.to_string())?;
    result.map_err(|e| e.to_string())?;
    captured
        .one_text_value()
        .map(str::to_owned)
        .ok_or_else(|| "EXPLAIN returned no plan".to_owned())
}

/// Whether a statement can be explained: one data statement.
pub(crate) fn explainable(operation: &str, sql: &str) -> bool {
    matches!(
        operation,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "WITH"
    ) && !sql.trim_end().trim_end_matches(';').contains(';')
}

/// Starts the capture task on connections from `opener`.
pub(crate) fn spawn(
    store: std::sync::Arc<PlanStore>,
    mut rx: tokio::sync::mpsc::Receiver<(String, Duration)>,
    opener: Opener,
) -> super::watchdog::Running {
    super::watchdog::Running::new(tokio::spawn(async move {
        let mut conn = None;
        // Failures are warned about on the first and every 100th, so that
        // a server where explaining cannot work (no connection, a role
        // without access) says so once, clearly, without a flood.
        let mut failures = 0u64;
        let mut failed = |what: &str, statement: &str, error: String| {
            failures += 1;
            let error = super::statement_shape(&error);
            if failures % 100 == 1 {
                tracing::warn!(target: "railyard::plans", failures, statement, error, "plan capture: {what}; plans of slow statements will be missing");
            } else {
                tracing::debug!(target: "railyard::plans", failures, statement, error, "plan capture: {what}");
            }
        };
        while let Some((sql, took)) = rx.recv().await {
            let mut shape = String::new();
            super::stats::normalize_into(&sql, &mut shape);
            if conn.is_none() {
                match opener.open().await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        failed("cannot open its connection", &shape, e.to_string());
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            match tokio::time::timeout(Duration::from_secs(5), explain(c, &sql)).await {
                Ok(Ok(json)) => {
                    if let Some(plan) = summarise(shape, &json, took) {
                        store.keep(plan);
                    }
                }
                Ok(Err(e)) => {
                    failed("cannot explain a slow statement", &shape, e);
                    // Its transaction or prepared statement may be left over.
                    conn = None;
                }
                Err(_) => {
                    failed("no plan within 5 s", &shape, String::new());
                    conn = None;
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_counted_and_statements_filtered() {
        assert_eq!(parameters("SELECT 1"), 0);
        assert_eq!(parameters("SELECT $1, $12 FROM t WHERE a = $3"), 12);
        assert!(explainable("SELECT", "SELECT 1;"));
        assert!(!explainable("SELECT", "SELECT 1; DROP TABLE t"));
        assert!(!explainable("CREATE", "CREATE TABLE t ()"));
    }

    #[tokio::test]
    async fn a_shape_is_offered_once_a_minute_and_within_the_rate() {
        let (store, mut rx) =
            PlanStore::new(PlanCapture::slower_than(Duration::ZERO).per_minute(3), None);
        for _ in 0..5 {
            store.offer("SELECT 1", "SELECT ?", Duration::ZERO);
        }
        for i in 0..5 {
            store.offer(
                &format!("SELECT {i} FROM t{i}"),
                &format!("SELECT ? FROM t{i}"),
                Duration::ZERO,
            );
        }
        let mut got = Vec::new();
        while let Ok((sql, _)) = rx.try_recv() {
            got.push(sql);
        }
        assert_eq!(got, ["SELECT 1", "SELECT 0 FROM t0", "SELECT 1 FROM t1"]);
    }

    fn captured(fingerprint: u64, node: &str, ms: f64) -> CapturedPlan {
        CapturedPlan {
            statement: "SELECT pad FROM t WHERE k = $1".into(),
            fingerprint,
            nodes: vec![node.into()],
            total_cost: 1.0,
            plan_rows: 1.0,
            top: Vec::new(),
            plan: serde_json::Value::Null,
            duration_ms: ms,
            captured_at: Instant::now(),
        }
    }

    #[test]
    fn a_change_is_reported_once_when_the_new_plan_runs_slower_even_after_a_stale_fast_sample() {
        let (store, _rx) = PlanStore::new(PlanCapture::slower_than(Duration::ZERO), None);
        for ms in [0.2, 0.3, 0.2] {
            store.keep(captured(1, "Index Scan", ms));
        }
        // Explained after the index went, timed before: fast.
        store.keep(captured(2, "Seq Scan", 0.2));
        assert!(store.changes().is_empty());
        store.keep(captured(2, "Seq Scan", 15.0));
        let c = store.changes();
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(
            (c[0].before.as_slice(), c[0].after.as_slice()),
            (&["Index Scan".to_owned()][..], &["Seq Scan".to_owned()][..])
        );
        assert!(c[0].before_ms < 0.3 && c[0].after_ms > 7.0, "{c:?}");
        store.keep(captured(2, "Seq Scan", 16.0));
        assert_eq!(store.changes().len(), 1);
        // A different plan that is not slower: nothing.
        store.keep(captured(3, "Bitmap Heap Scan", 12.0));
        store.keep(captured(3, "Bitmap Heap Scan", 11.0));
        assert_eq!(store.changes().len(), 1);
    }

    #[test]
    fn plans_are_summarised_with_their_constants_replaced() {
        let json = r#"[{"Plan": {"Node Type": "Hash Join", "Total Cost": 100.0, "Plan Rows": 10,
            "Hash Cond": "(a.id = b.a_id)",
            "Plans": [{"Node Type": "Seq Scan", "Relation Name": "a", "Total Cost": 60.0, "Plan Rows": 1000,
                       "Filter": "(email = 'secret@x.y'::text)"},
                      {"Node Type": "Index Scan", "Relation Name": "b", "Index Name": "b_pkey",
                       "Total Cost": 10.0, "Plan Rows": 5, "Index Cond": "(id > 987654)"}]}}]"#;
        let p = summarise("SELECT ?".into(), json, Duration::ZERO).unwrap();
        assert_eq!(p.nodes, ["Hash Join", "Seq Scan", "Index Scan"]);
        assert_eq!(p.top[0].node_type, "Seq Scan");
        assert_eq!(p.top[0].self_cost, 60.0);
        assert_eq!(p.top[1].node_type, "Hash Join");
        let text = serde_json::to_string(&p.plan).unwrap();
        assert!(
            !text.contains("secret@x.y") && !text.contains("987654"),
            "{text}"
        );
        let other = json.replace("b_pkey", "b_other_idx");
        assert_ne!(
            summarise("SELECT ?".into(), &other, Duration::ZERO)
                .unwrap()
                .fingerprint,
            p.fingerprint
        );
    }
}
