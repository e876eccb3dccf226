//! What a rule measures and when it holds: a metric read from each
//! [`Sample`](crate::watch::Sample), compared with a threshold, per series
//! (a replica, a pool, an error class).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::watch::Sample;

/// How urgent an alert is; routes choose channels by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Severity {
    /// Worth seeing on the page.
    Info,
    /// Needs a look soon.
    Warning,
    /// Needs someone now.
    Critical,
}

impl Severity {
    /// `info`, `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// What a rule measures. Each metric gives one value per series, with the
/// series' labels (`replica`, `pool`, `class`, `statement`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Metric {
    /// Bytes of WAL a replica is behind (`replica`).
    ReplicaLagBytes,
    /// Seconds a replica is behind (`replica`).
    ReplicaLagSeconds,
    /// 1 while a replica is ejected from reads (`replica`).
    ReplicaEjected,
    /// 1 while the primary does not answer its probe.
    PrimaryDown,
    /// Failures per second over the last period (`class`); constraint
    /// violations are the application's business and are not counted.
    ErrorsPerSecond,
    /// Connections in use over the pool's size (`pool`).
    PoolSaturation,
    /// Check-outs shed in the last minute (`pool`).
    PoolShed,
    /// 1 while a pool's circuit breaker is open (`pool`).
    BreakerOpen,
    /// 1 while the migrations' check is not healthy (pending, edited,
    /// unknown to this binary).
    MigrationsNotCurrent,
    /// The p99 of all queries over the last period, ms.
    QueryP99Ms,
    /// The p99 over the last minute of the statements whose text contains
    /// this (`statement`), ms; needs the rules' statement hook.
    StatementP99Ms(String),
    /// 1 while the storage check is degraded: a retention run left the live
    /// history over its size threshold (`RAILYARD_RETENTION_SIZE_THRESHOLD`).
    StorageCannotFree,
}

impl Metric {
    /// The metric's name in the rules file.
    pub fn name(&self) -> &'static str {
        match self {
            Metric::ReplicaLagBytes => "replica_lag_bytes",
            Metric::ReplicaLagSeconds => "replica_lag_seconds",
            Metric::ReplicaEjected => "replica_ejected",
            Metric::PrimaryDown => "primary_down",
            Metric::ErrorsPerSecond => "errors_per_second",
            Metric::PoolSaturation => "pool_saturation",
            Metric::PoolShed => "pool_shed",
            Metric::BreakerOpen => "breaker_open",
            Metric::MigrationsNotCurrent => "migrations_not_current",
            Metric::QueryP99Ms => "query_p99_ms",
            Metric::StatementP99Ms(_) => "statement_p99_ms",
            Metric::StorageCannotFree => "storage_cannot_free",
        }
    }

    /// Every metric name, for error messages.
    pub(crate) const NAMES: [&'static str; 12] = [
        "replica_lag_bytes",
        "replica_lag_seconds",
        "replica_ejected",
        "primary_down",
        "errors_per_second",
        "pool_saturation",
        "pool_shed",
        "breaker_open",
        "migrations_not_current",
        "query_p99_ms",
        "statement_p99_ms",
        "storage_cannot_free",
    ];

    pub(crate) fn parse(name: &str, statement: Option<String>) -> Option<Metric> {
        Some(match name {
            "replica_lag_bytes" => Metric::ReplicaLagBytes,
            "replica_lag_seconds" => Metric::ReplicaLagSeconds,
            "replica_ejected" => Metric::ReplicaEjected,
            "primary_down" => Metric::PrimaryDown,
            "errors_per_second" => Metric::ErrorsPerSecond,
            "pool_saturation" => Metric::PoolSaturation,
            "pool_shed" => Metric::PoolShed,
            "breaker_open" => Metric::BreakerOpen,
            "migrations_not_current" => Metric::MigrationsNotCurrent,
            "query_p99_ms" => Metric::QueryP99Ms,
            "statement_p99_ms" => Metric::StatementP99Ms(statement?),
            "storage_cannot_free" => Metric::StorageCannotFree,
            _ => return None,
        })
    }
}

/// Labels of one series.
pub type Labels = BTreeMap<String, String>;

fn one(key: &str, value: &str) -> Labels {
    BTreeMap::from([(key.to_owned(), value.to_owned())])
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// The series of a metric in one sample. `statement_p99` answers the
/// statement groups' p99 (over the last minute).
pub(crate) fn series(
    metric: &Metric,
    s: &Sample,
    statement_p99: &dyn Fn(&str) -> Option<f64>,
) -> Vec<(Labels, f64)> {
    match metric {
        Metric::ReplicaLagBytes => s
            .replicas
            .iter()
            .map(|r| (one("replica", &r.name), r.lag_bytes as f64))
            .collect(),
        Metric::ReplicaLagSeconds => s
            .replicas
            .iter()
            .map(|r| (one("replica", &r.name), r.lag_seconds))
            .collect(),
        Metric::ReplicaEjected => s
            .replicas
            .iter()
            .map(|r| (one("replica", &r.name), flag(r.ejected)))
            .collect(),
        Metric::PrimaryDown => vec![(Labels::new(), flag(!s.primary_up))],
        Metric::ErrorsPerSecond => s
            .errors_per_s
            .iter()
            .filter(|(class, _)| **class != "constraint")
            .map(|(class, v)| (one("class", class), *v))
            .collect(),
        Metric::PoolSaturation => s
            .pools
            .iter()
            .map(|p| {
                (
                    one("pool", &p.name),
                    p.in_use as f64 / f64::from(p.max.max(1)),
                )
            })
            .collect(),
        Metric::PoolShed => s
            .pools
            .iter()
            .map(|p| (one("pool", &p.name), p.shed_last_minute as f64))
            .collect(),
        Metric::BreakerOpen => s
            .pools
            .iter()
            .map(|p| (one("pool", &p.name), flag(p.breaker_open)))
            .collect(),
        Metric::MigrationsNotCurrent => s
            .migrations
            .iter()
            .map(|m| {
                (
                    Labels::new(),
                    flag(m.status != railyard::observe::HealthStatus::Healthy),
                )
            })
            .collect(),
        Metric::QueryP99Ms => s
            .p99_ms
            .map(|v| vec![(Labels::new(), v)])
            .unwrap_or_default(),
        Metric::StatementP99Ms(group) => statement_p99(group)
            .map(|v| vec![(one("statement", group), v)])
            .unwrap_or_default(),
        Metric::StorageCannotFree => {
            vec![(
                Labels::new(),
                flag(s.reasons.iter().any(|c| {
                    c.name == "storage" && c.status != railyard::observe::HealthStatus::Healthy
                })),
            )]
        }
    }
}

/// When a value breaks the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Op {
    /// Strictly above.
    Above(f64),
    /// Strictly below.
    Below(f64),
}

impl Op {
    pub(crate) fn holds(self, v: f64) -> bool {
        match self {
            Op::Above(t) => v > t,
            Op::Below(t) => v < t,
        }
    }
}

/// An alert rule: a metric, a threshold, how long it must hold, how urgent it
/// is, and labels of its own.
///
/// ```
/// use std::time::Duration;
/// use railyard_ops::alert::{Metric, Op, Rule, Severity};
/// let rule = Rule::new("replica_lag", Metric::ReplicaLagSeconds, Op::Above(10.0))
///     .for_duration(Duration::from_secs(30))
///     .severity(Severity::Warning)
///     .label("team", "db");
/// assert_eq!(rule.name, "replica_lag");
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Rule {
    /// Its name (the `rule` label of its alerts).
    pub name: String,
    /// What it measures.
    pub metric: Metric,
    /// When it holds.
    pub op: Op,
    /// How long it must hold before the alert fires (pending until then).
    pub for_: Duration,
    /// How urgent.
    pub severity: Severity,
    /// Labels added to its alerts.
    pub labels: Labels,
}

impl Rule {
    /// A rule that fires as soon as it holds, with severity warning.
    pub fn new(name: impl Into<String>, metric: Metric, op: Op) -> Self {
        Rule {
            name: name.into(),
            metric,
            op,
            for_: Duration::ZERO,
            severity: Severity::Warning,
            labels: Labels::new(),
        }
    }

    /// How long it must hold.
    #[must_use]
    pub fn for_duration(mut self, d: Duration) -> Self {
        self.for_ = d;
        self
    }

    /// How urgent.
    #[must_use]
    pub fn severity(mut self, s: Severity) -> Self {
        self.severity = s;
        self
    }

    /// A label of its own.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The built-in rules, with their defaults:
    ///
    /// | rule | metric | fires when | for | severity |
    /// |---|---|---|---|---|
    /// | `primary_down` | `primary_down` | the primary does not answer | 5 s | critical |
    /// | `replica_lag` | `replica_lag_seconds` | above 30 s | 30 s | warning |
    /// | `replica_ejected` | `replica_ejected` | a replica is out of reads | 30 s | warning |
    /// | `error_rate` | `errors_per_second` | above 5/s in a class | 60 s | warning |
    /// | `pool_saturated` | `pool_saturation` | every connection in use | 30 s | warning |
    /// | `pool_shedding` | `pool_shed` | a check-out was shed | at once | warning |
    /// | `breaker_open` | `breaker_open` | a circuit breaker is open | at once | critical |
    /// | `migrations` | `migrations_not_current` | the schema is not the binary's | at once | critical |
    /// | `query_p99` | `query_p99_ms` | p99 of all queries above 500 ms | 60 s | warning |
    /// | `storage` | `storage_cannot_free` | retention cannot bring the live history under its size threshold | at once | warning |
    pub fn builtin() -> Vec<Rule> {
        let s = Duration::from_secs;
        vec![
            Rule::new("primary_down", Metric::PrimaryDown, Op::Above(0.0))
                .for_duration(s(5))
                .severity(Severity::Critical),
            Rule::new("replica_lag", Metric::ReplicaLagSeconds, Op::Above(30.0))
                .for_duration(s(30)),
            Rule::new("replica_ejected", Metric::ReplicaEjected, Op::Above(0.0))
                .for_duration(s(30)),
            Rule::new("error_rate", Metric::ErrorsPerSecond, Op::Above(5.0)).for_duration(s(60)),
            Rule::new("pool_saturated", Metric::PoolSaturation, Op::Above(0.99))
                .for_duration(s(30)),
            Rule::new("pool_shedding", Metric::PoolShed, Op::Above(0.0)),
            Rule::new("breaker_open", Metric::BreakerOpen, Op::Above(0.0))
                .severity(Severity::Critical),
            Rule::new("migrations", Metric::MigrationsNotCurrent, Op::Above(0.0))
                .severity(Severity::Critical),
            Rule::new("query_p99", Metric::QueryP99Ms, Op::Above(500.0)).for_duration(s(60)),
            Rule::new("storage", Metric::StorageCannotFree, Op::Above(0.0)),
        ]
    }
}
