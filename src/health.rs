//! Health verdicts with reasons, readiness, and Prometheus metrics.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use diesel_async::SimpleAsyncConnection;
use serde::Serialize;

use crate::database::Database;
use crate::migrate::{ChecksumState, MigrationState};
use crate::observe::{CLASSES, DURATION_BUCKETS, DurationHistogram};
use crate::route::ReplicaStatus;

/// A verdict, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
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

/// The health of a `Database`: the worst of its checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    /// The overall verdict.
    pub status: HealthStatus,
    /// Every check, with its reason.
    pub checks: Vec<HealthCheck>,
}

impl HealthReport {
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

impl Database {
    /// Checks the primary (a round trip, timed), each replica (from the monitor's
    /// figures), the migrations (when the database was built with them), pool
    /// saturation, the error rate of the last minute by class, and the circuit
    /// breakers.
    ///
    /// ```no_run
    /// # async fn demo(db: railyard::Database) {
    /// let report = db.health().await;
    /// if report.status != railyard::HealthStatus::Healthy {
    ///     for c in &report.checks {
    ///         eprintln!("{}: {:?} — {}", c.name, c.status, c.reason);
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn health(&self) -> HealthReport {
        let mut checks = vec![self.primary_check().await];
        if let Some(c) = self.migration_check().await {
            checks.push(c);
        }
        for r in self.replica_health() {
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
                        r.last_error.unwrap_or_else(|| "checks fail".into())
                    ),
                ),
                ReplicaStatus::Promoted => (
                    HealthStatus::Degraded,
                    "no longer a replica: it was promoted".to_owned(),
                ),
            };
            checks.push(check(format!("replica {}", r.name), status, reason));
        }
        for p in self.pool_status() {
            let used = p.connections.saturating_sub(p.idle);
            let saturated = used >= p.max_size && p.gets_waited > 0;
            checks.push(check(
                format!("pool {}", p.name),
                if p.circuit_open {
                    if p.name == "primary" {
                        HealthStatus::Unhealthy
                    } else {
                        HealthStatus::Degraded
                    }
                } else if saturated {
                    HealthStatus::Degraded
                } else {
                    HealthStatus::Healthy
                },
                if p.circuit_open {
                    "circuit breaker open: connections fail fast".to_owned()
                } else {
                    format!(
                        "{used} of {} connections in use, {} checkouts waited, {} timed out",
                        p.max_size, p.gets_waited, p.gets_timed_out
                    )
                },
            ));
        }
        let (total, errors) = self.observer().metrics.recent();
        // Constraint violations are the application's business, not the database's.
        let failing: u64 = CLASSES
            .iter()
            .zip(errors)
            .filter(|(c, _)| **c != crate::retry::ErrorClass::Constraint)
            .map(|(_, n)| n)
            .sum();
        let by_class = CLASSES
            .iter()
            .zip(errors)
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rate = if total == 0 {
            0.0
        } else {
            failing as f64 / total as f64
        };
        checks.push(check(
            "errors",
            if total >= 20 && rate > 0.05 {
                HealthStatus::Degraded
            } else {
                HealthStatus::Healthy
            },
            format!(
                "{failing} of {total} queries failed in the last minute ({:.1} %){}",
                rate * 100.0,
                if by_class.is_empty() {
                    String::new()
                } else {
                    format!(": {by_class}")
                }
            ),
        ));
        let status = checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(HealthStatus::Healthy);
        HealthReport { status, checks }
    }

    /// Ready to serve: the primary answers and the migrations are current.
    pub async fn readiness(&self) -> HealthReport {
        let mut checks = vec![self.primary_check().await];
        if let Some(c) = self.migration_check().await {
            checks.push(c);
        }
        let status = checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(HealthStatus::Healthy);
        HealthReport { status, checks }
    }

    async fn primary_check(&self) -> HealthCheck {
        let started = Instant::now();
        let probe = async {
            let mut conn = self.primary().await?;
            conn.batch_execute("SELECT 1").await?;
            Ok::<_, crate::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(())) => HealthCheck {
                name: "primary".into(),
                status: HealthStatus::Healthy,
                reason: "reachable".into(),
                latency_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            },
            Ok(Err(e)) => check(
                "primary",
                HealthStatus::Unhealthy,
                format!("unreachable: {e}"),
            ),
            Err(_) => check("primary", HealthStatus::Unhealthy, "no answer within 2 s"),
        }
    }

    async fn migration_check(&self) -> Option<HealthCheck> {
        let migrator = self.migrator()?;
        let rows = match tokio::time::timeout(
            Duration::from_secs(5),
            migrator.status(self.config()),
        )
        .await
        {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                return Some(check(
                    "migrations",
                    HealthStatus::Unhealthy,
                    format!("cannot read: {e}"),
                ));
            }
            Err(_) => {
                return Some(check(
                    "migrations",
                    HealthStatus::Unhealthy,
                    "no answer within 5 s",
                ));
            }
        };
        let mut pending = Vec::new();
        for r in &rows {
            match r.state {
                MigrationState::Unknown => {
                    return Some(check(
                        "migrations",
                        HealthStatus::Unhealthy,
                        format!(
                            "the database has {} applied, unknown to this binary",
                            r.version
                        ),
                    ));
                }
                MigrationState::Applied {
                    checksum: ChecksumState::Edited,
                    ..
                } => {
                    return Some(check(
                        "migrations",
                        HealthStatus::Unhealthy,
                        format!("{} was edited after it was applied", r.version),
                    ));
                }
                MigrationState::Pending => pending.push(r.version.clone()),
                MigrationState::Applied { .. } => {}
            }
        }
        Some(if pending.is_empty() {
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
        })
    }

    /// Prometheus text exposition of query durations (OpenTelemetry's bucket
    /// bounds), pool gauges, retries and errors by class, and replica lag.
    pub fn metrics_text(&self) -> String {
        let mut out = String::with_capacity(4096);
        let m = &self.observer().metrics;
        out.push_str("# HELP db_client_operation_duration_seconds Duration of database queries.\n");
        out.push_str("# TYPE db_client_operation_duration_seconds histogram\n");
        for (route, h) in [("primary", &m.primary), ("replica", &m.replica)] {
            render_histogram(&mut out, route, h);
        }
        out.push_str("# HELP railyard_errors_total Failed queries by error class.\n# TYPE railyard_errors_total counter\n");
        for (c, n) in CLASSES.iter().zip(&m.errors) {
            let _ = writeln!(
                out,
                "railyard_errors_total{{class=\"{c}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP railyard_retries_total Retried operations by error class.\n# TYPE railyard_retries_total counter\n");
        for (c, n) in self.retry_counts() {
            let _ = writeln!(out, "railyard_retries_total{{class=\"{c}\"}} {n}");
        }
        out.push_str("# HELP railyard_pool_connections Open connections by state.\n# TYPE railyard_pool_connections gauge\n");
        let pools = self.pool_status();
        for p in &pools {
            let used = p.connections.saturating_sub(p.idle);
            let _ = writeln!(
                out,
                "railyard_pool_connections{{pool=\"{}\",state=\"idle\"}} {}",
                p.name, p.idle
            );
            let _ = writeln!(
                out,
                "railyard_pool_connections{{pool=\"{}\",state=\"used\"}} {used}",
                p.name
            );
        }
        out.push_str("# HELP railyard_pool_max_connections Pool size limit.\n# TYPE railyard_pool_max_connections gauge\n");
        for p in &pools {
            let _ = writeln!(
                out,
                "railyard_pool_max_connections{{pool=\"{}\"}} {}",
                p.name, p.max_size
            );
        }
        out.push_str("# HELP railyard_pool_checkouts_waited_total Checkouts that had to wait.\n# TYPE railyard_pool_checkouts_waited_total counter\n");
        for p in &pools {
            let _ = writeln!(
                out,
                "railyard_pool_checkouts_waited_total{{pool=\"{}\"}} {}",
                p.name, p.gets_waited
            );
        }
        out.push_str("# HELP railyard_circuit_open Whether a pool's circuit breaker is open.\n# TYPE railyard_circuit_open gauge\n");
        for p in &pools {
            let _ = writeln!(
                out,
                "railyard_circuit_open{{pool=\"{}\"}} {}",
                p.name,
                u8::from(p.circuit_open)
            );
        }
        out.push_str("# HELP railyard_replica_lag_bytes WAL bytes a replica is behind the primary.\n# TYPE railyard_replica_lag_bytes gauge\n");
        let replicas = self.replica_health();
        for r in &replicas {
            let _ = writeln!(
                out,
                "railyard_replica_lag_bytes{{replica=\"{}\"}} {}",
                r.name, r.lag_bytes
            );
        }
        out.push_str("# HELP railyard_replica_healthy Whether a replica serves reads.\n# TYPE railyard_replica_healthy gauge\n");
        for r in &replicas {
            let _ = writeln!(
                out,
                "railyard_replica_healthy{{replica=\"{}\"}} {}",
                r.name,
                u8::from(r.status == ReplicaStatus::Healthy)
            );
        }
        out
    }
}

fn render_histogram(out: &mut String, route: &str, h: &DurationHistogram) {
    let mut cumulative = 0;
    for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
        cumulative += h.buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "db_client_operation_duration_seconds_bucket{{db_system_name=\"postgresql\",route=\"{route}\",le=\"{bound}\"}} {cumulative}"
        );
    }
    cumulative += h.buckets[DURATION_BUCKETS.len()].load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "db_client_operation_duration_seconds_bucket{{db_system_name=\"postgresql\",route=\"{route}\",le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "db_client_operation_duration_seconds_sum{{db_system_name=\"postgresql\",route=\"{route}\"}} {}",
        h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
    );
    let _ = writeln!(
        out,
        "db_client_operation_duration_seconds_count{{db_system_name=\"postgresql\",route=\"{route}\"}} {}",
        h.count.load(Ordering::Relaxed)
    );
}
