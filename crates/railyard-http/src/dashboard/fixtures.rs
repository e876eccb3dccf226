//! Samples, statements and plans for the dashboard's unit tests.

use std::collections::BTreeMap;
use std::sync::Arc;

use railyard::observe::HealthStatus;
use railyard::observe::{CapturedPlan, CostNode};
use railyard_ops::watch::{PoolSample, ReplicaSample, Sample, TopStatement};

pub(super) fn sample(at_ms: u64, i: usize) -> Arc<Sample> {
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

pub(super) fn top(i: usize) -> TopStatement {
    let mut t = TopStatement::default();
    t.statement = format!("SELECT * FROM t{i} WHERE a < $1 AND b = '?'");
    t.calls = 10;
    t.total_ms = 100.0 - i as f64;
    t.p50_ms = 1.0;
    t.p95_ms = 2.0;
    t.p99_ms = 3.0;
    t
}

pub(super) fn pool() -> PoolSample {
    let mut p = PoolSample::default();
    p.name = "primary".into();
    p.route = "primary";
    p.open = 4;
    p.idle = 3;
    p.in_use = 1;
    p.max = 16;
    p
}

pub(super) fn replica(
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

pub(super) fn plan(statement: &str, nodes: usize, duration_ms: f64) -> CapturedPlan {
    let mut p = CapturedPlan::empty(statement);
    p.fingerprint = 1;
    p.nodes = (0..nodes).map(|i| format!("Node {i}")).collect();
    p.total_cost = 12.345678;
    p.plan_rows = 10.4;
    p.top = (0..5)
        .map(|i| {
            let mut n = CostNode::default();
            n.node_type = "Seq Scan".into();
            n.relation = Some(format!("t{i}"));
            n.self_cost = 1.0;
            n.plan_rows = 1.0;
            n
        })
        .collect();
    p.plan = serde_json::json!([{"Plan": {}}]);
    p.duration_ms = duration_ms;
    p
}
