//! The statements block: top statements with their captured plans, other
//! plans and plan changes, each list bounded and each text cut.

use railyard::observe::{CapturedPlan, CostNode, PlanChange};
use railyard_ops::watch::TopStatement;
use serde::Serialize;

use super::{OTHER_PLANS, PLAN_CHANGES, PLAN_NODES, STATEMENT_CHARS, TOP_STATEMENTS, cut, round};

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
                .map(|mut n| {
                    n.node_type = cut(&n.node_type, 60);
                    n.relation = n.relation.map(|r| cut(&r, 128));
                    n.self_cost = round(n.self_cost, 2);
                    n.plan_rows = round(n.plan_rows, 0);
                    n
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

#[cfg(test)]
mod tests {

    use super::*;
    use crate::dashboard::fixtures::{plan, top};

    #[test]
    fn statements_plans_and_changes_are_bounded_and_matched() {
        let tops: Vec<_> = (0..30).map(top).collect();
        let mut plans = vec![plan(&tops[1].statement, 40, 5.0)];
        plans.extend((0..20).map(|i| plan(&format!("SELECT {i}"), 2, i as f64)));
        let changes: Vec<_> = (0..30)
            .map(|i| {
                let mut c = PlanChange::empty(if i == 29 {
                    tops[1].statement.clone()
                } else {
                    format!("x{i}")
                });
                c.before = vec!["Index Scan".into(); 40];
                c.after = vec!["Seq Scan".into()];
                c.before_ms = 1.0;
                c.after_ms = 3.0;
                c
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
}
