//! Health verdicts with reasons: the rules that turn what the lower layers
//! report (the primary's probe, migrations, replicas, pools, recent errors)
//! into healthy, degraded or unhealthy. The `Database` gathers the figures;
//! the rules live here, with no I/O of their own.

use std::time::Duration;

use serde::Serialize;

use super::Metrics;
use crate::conn::{PoolStatus, Route};
use crate::error::ErrorClass;
use crate::migrate::{ChecksumState, MigrationState, MigrationStatus};
use crate::route::{ReplicaHealth, ReplicaStatus};

/// A verdict, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Everything works.
    Healthy,
    /// Serving, with reduced capacity or guarantees (reads on the primary, a
    /// saturated pool, errors above the usual rate).
    Degraded,
    /// Not serving: the primary is unreachable, or the schema is not the binary's.
    Unhealthy,
}

/// One check behind a verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthCheck {
    /// What was checked (`primary`, `replica localhost:5433`, `migrations`, …).
    pub name: String,
    /// Its verdict.
    pub status: HealthStatus,
    /// Why, in words.
    pub reason: String,
    /// Round-trip time, for checks that made one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

impl HealthCheck {
    /// A check named `name` with this verdict and reason (a product crate's
    /// own checks, given to `Database::health` through an attachment).
    ///
    /// ```
    /// use railyard::observe::{HealthCheck, HealthStatus};
    /// let c = HealthCheck::new("queue", HealthStatus::Healthy, "12 jobs waiting");
    /// assert_eq!(c.name, "queue");
    /// ```
    pub fn new(name: impl Into<String>, status: HealthStatus, reason: impl Into<String>) -> Self {
        check(name, status, reason)
    }
}

/// The health of a `Database`: the worst of its checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// The overall verdict.
    pub status: HealthStatus,
    /// Every check, with its reason.
    pub checks: Vec<HealthCheck>,
}

impl HealthReport {
    /// A report whose verdict is the worst of `checks`.
    pub fn of(checks: Vec<HealthCheck>) -> Self {
        let status = checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(HealthStatus::Healthy);
        HealthReport { status, checks }
    }

    /// The report as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

fn check(name: impl Into<String>, status: HealthStatus, reason: impl Into<String>) -> HealthCheck {
    HealthCheck {
        name: name.into(),
        status,
        reason: reason.into(),
        latency_ms: None,
    }
}

/// How the primary answered its probe.
#[derive(Debug)]
pub(crate) enum PrimaryProbe {
    /// It answered, in this time.
    Answered(Duration),
    /// The probe failed.
    Failed(String),
    /// No answer within the bound.
    Silent(Duration),
}

pub(crate) fn primary(p: PrimaryProbe) -> HealthCheck {
    match p {
        PrimaryProbe::Answered(rtt) => HealthCheck {
            name: "primary".into(),
            status: HealthStatus::Healthy,
            reason: "reachable".into(),
            latency_ms: Some(rtt.as_secs_f64() * 1000.0),
        },
        PrimaryProbe::Failed(e) => check(
            "primary",
            HealthStatus::Unhealthy,
            format!("unreachable: {e}"),
        ),
        PrimaryProbe::Silent(bound) => check(
            "primary",
            HealthStatus::Unhealthy,
            format!("no answer within {bound:?}"),
        ),
    }
}

/// The migrations' verdict: the schema must be exactly the binary's.
pub(crate) fn migrations(rows: Result<Vec<MigrationStatus>, String>) -> HealthCheck {
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            return check(
                "migrations",
                HealthStatus::Unhealthy,
                format!("cannot read: {e}"),
            );
        }
    };
    let mut pending = Vec::new();
    for r in &rows {
        match r.state {
            MigrationState::Unknown => {
                return check(
                    "migrations",
                    HealthStatus::Unhealthy,
                    format!(
                        "the database has {} applied, unknown to this binary",
                        r.version
                    ),
                );
            }
            MigrationState::Applied {
                checksum: ChecksumState::Edited,
                ..
            } => {
                return check(
                    "migrations",
                    HealthStatus::Unhealthy,
                    format!("{} was edited after it was applied", r.version),
                );
            }
            MigrationState::Orphaned => {
                return check(
                    "migrations",
                    HealthStatus::Unhealthy,
                    format!(
                        "{} is recorded in railyard_schema_migrations but not in diesel's table",
                        r.version
                    ),
                );
            }
            MigrationState::Pending => pending.push(r.version.clone()),
            MigrationState::Applied { .. } => {}
        }
    }
    if pending.is_empty() {
        check(
            "migrations",
            HealthStatus::Healthy,
            format!("{} applied, checksums match", rows.len()),
        )
    } else {
        check(
            "migrations",
            HealthStatus::Unhealthy,
            format!("pending: {}", pending.join(", ")),
        )
    }
}

pub(crate) fn replica(r: &ReplicaHealth) -> HealthCheck {
    let (status, reason) = match r.status {
        ReplicaStatus::Healthy => (
            HealthStatus::Healthy,
            format!("streaming, {} bytes behind", r.lag_bytes),
        ),
        ReplicaStatus::Unknown => (HealthStatus::Degraded, "not checked yet".to_owned()),
        ReplicaStatus::Lagging => (
            HealthStatus::Degraded,
            format!(
                "ejected: {} bytes and {:.1?} behind; reads go elsewhere",
                r.lag_bytes, r.lag
            ),
        ),
        ReplicaStatus::Down => (
            HealthStatus::Degraded,
            format!(
                "ejected: {}; reads go to the primary",
                r.last_error.as_deref().unwrap_or("checks fail")
            ),
        ),
        ReplicaStatus::Promoted => (
            HealthStatus::Degraded,
            "no longer a replica: it was promoted".to_owned(),
        ),
    };
    check(format!("replica {}", r.name), status, reason)
}

/// A pool's verdict: an open breaker, shedding in the last minute, or every
/// connection in use with check-outs waiting.
pub(crate) fn pool(p: &PoolStatus) -> HealthCheck {
    let used = p.connections.saturating_sub(p.idle);
    let saturated = used >= p.max_size && p.gets_waited > 0;
    let shedding = p.shed_last_minute > 0;
    let status = if p.circuit_open {
        match p.route {
            Route::Primary => HealthStatus::Unhealthy,
            Route::Replica(_) => HealthStatus::Degraded,
        }
    } else if saturated || shedding {
        HealthStatus::Degraded
    } else {
        HealthStatus::Healthy
    };
    let reason = if p.circuit_open {
        "circuit breaker open: connections fail fast".to_owned()
    } else if shedding {
        format!(
            "overloaded: {} check-outs shed in the last minute ({} since start), beyond {} waiting or after waiting {:?} with all {} connections in use",
            p.shed_last_minute, p.shed, p.max_waiters, p.max_wait, p.max_size
        )
    } else {
        format!(
            "{used} of {} connections in use, {} checkouts waited, {} timed out",
            p.max_size, p.gets_waited, p.gets_timed_out
        )
    };
    check(format!("pool {}", p.name), status, reason)
}

/// The verdict of a handle that was closed.
pub(crate) fn closed() -> HealthCheck {
    check(
        "shutdown",
        HealthStatus::Unhealthy,
        "closed: Database::close was called; new work is refused",
    )
}

/// The verdict of a process that is shutting down (its database may still
/// finish the work in flight).
pub fn shutting_down() -> HealthCheck {
    check(
        "shutdown",
        HealthStatus::Unhealthy,
        "shutting down: finishing the work in flight; send no new traffic here",
    )
}

/// The error rate of the last minute, by class. Constraint violations are the
/// application's business, not the database's.
pub(crate) fn errors(metrics: &Metrics) -> HealthCheck {
    let (total, errors) = metrics.recent();
    let failing: u64 = ErrorClass::ALL
        .iter()
        .filter(|c| **c != ErrorClass::Constraint)
        .map(|c| errors[c.index()])
        .sum();
    let by_class = ErrorClass::ALL
        .iter()
        .filter(|c| errors[c.index()] > 0)
        .map(|c| format!("{c} {}", errors[c.index()]))
        .collect::<Vec<_>>()
        .join(", ");
    let rate = if total == 0 {
        0.0
    } else {
        failing as f64 / total as f64
    };
    check(
        "errors",
        if total >= 20 && rate > 0.05 {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        },
        format!(
            "{failing} of {total} operations (queries and check-outs) failed in the last minute ({:.1} %){}",
            rate * 100.0,
            if by_class.is_empty() {
                String::new()
            } else {
                format!(": {by_class}")
            }
        ),
    )
}

/// A change stream's slot: degraded when it retains more WAL than its limit
/// (a consumer that stopped acknowledging fills the primary's disk), or
/// when it was lost.
pub fn slot(name: &str, retained: Option<u64>, limit: u64, lost: bool) -> HealthCheck {
    let (status, reason) = if lost {
        (
            HealthStatus::Degraded,
            "lost: the slot is gone from the primary (a failover?); its stream ended".to_owned(),
        )
    } else {
        match retained {
            None => (HealthStatus::Healthy, "not measured yet".to_owned()),
            Some(b) if b > limit => (
                HealthStatus::Degraded,
                format!(
                    "retains {b} bytes of WAL, over its limit of {limit}: acknowledge events, or drop the slot if it is abandoned"
                ),
            ),
            Some(b) => (
                HealthStatus::Healthy,
                format!("retains {b} bytes of WAL (limit {limit})"),
            ),
        }
    };
    check(format!("slot {name}"), status, reason)
}

/// How long a plan change keeps the verdict degraded.
pub const PLAN_CHANGE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Plan capture's verdict: degraded while a statement's plan changed and got
/// slower within [`PLAN_CHANGE_WINDOW`], naming the newest three (shapes
/// only: never a value).
pub(crate) fn plans(captured: usize, changes: &[super::PlanChange]) -> HealthCheck {
    let recent: Vec<&super::PlanChange> = changes
        .iter()
        .rev()
        .filter(|c| c.seen_at.elapsed() < PLAN_CHANGE_WINDOW)
        .collect();
    if recent.is_empty() {
        return check(
            "plans",
            HealthStatus::Healthy,
            format!(
                "{captured} plans captured; no plan change slowed a statement in the last {} minutes",
                PLAN_CHANGE_WINDOW.as_secs() / 60
            ),
        );
    }
    let named = recent
        .iter()
        .take(3)
        .map(|c| {
            format!(
                "{} ({} -> {}, {:.1} ms -> {:.1} ms)",
                c.statement,
                c.before.join(" > "),
                c.after.join(" > "),
                c.before_ms,
                c.after_ms
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    check(
        "plans",
        HealthStatus::Degraded,
        format!(
            "{} statements changed plan and got slower in the last {} minutes: {named}",
            recent.len(),
            PLAN_CHANGE_WINDOW.as_secs() / 60
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(shed_last_minute: u64) -> PoolStatus {
        PoolStatus {
            name: "primary".into(),
            route: Route::Primary,
            connections: 4,
            idle: 4,
            max_size: 4,
            gets: 100,
            gets_waited: 0,
            gets_timed_out: 0,
            connections_created: 4,
            connections_closed_broken: 0,
            circuit_open: false,
            waiters: 0,
            waiters_peak: 16,
            max_waiters: 16,
            max_wait: Duration::from_millis(250),
            shed: 70,
            shed_last_minute,
            closed: false,
        }
    }

    #[test]
    fn a_pool_that_shed_in_the_last_minute_is_degraded_and_says_how_much() {
        let c = pool(&status(64));
        assert_eq!(c.status, HealthStatus::Degraded);
        assert!(
            c.reason.contains("64 check-outs shed in the last minute"),
            "{}",
            c.reason
        );
        assert!(c.reason.contains("16 waiting"), "{}", c.reason);
        assert_eq!(pool(&status(0)).status, HealthStatus::Healthy);
    }
}
