//! The Prometheus text exposition of what `observe` and the lower layers
//! report: query durations (OpenTelemetry's bucket bounds), errors and
//! retries by class, pool gauges, shed check-outs, circuit breakers and
//! replica lag.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::{DURATION_BUCKETS, DurationHistogram, Metrics};
use crate::conn::PoolStatus;
use crate::error::ErrorClass;
use crate::route::{ReplicaHealth, ReplicaStatus};

/// Everything `/metrics` shows, gathered by the `Database`.
pub(crate) struct Figures<'a> {
    pub(crate) metrics: &'a Metrics,
    pub(crate) retries: Vec<(ErrorClass, u64)>,
    pub(crate) pools: Vec<PoolStatus>,
    pub(crate) replicas: Vec<ReplicaHealth>,
}

// Long by design: one block per metric family, in the order the exposition prints them.
pub(crate) fn render(f: &Figures<'_>) -> String {
    let mut out = String::with_capacity(4096);
    let m = f.metrics;
    out.push_str("# HELP db_client_operation_duration_seconds Duration of database queries.\n");
    out.push_str("# TYPE db_client_operation_duration_seconds histogram\n");
    for (route, h) in [("primary", &m.primary), ("replica", &m.replica)] {
        render_histogram(&mut out, route, h);
    }
    out.push_str("# HELP railyard_errors_total Failed queries by error class.\n# TYPE railyard_errors_total counter\n");
    for c in ErrorClass::ALL {
        let _ = writeln!(
            out,
            "railyard_errors_total{{class=\"{c}\"}} {}",
            m.errors[c.index()].load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP railyard_retries_total Retried operations by error class.\n# TYPE railyard_retries_total counter\n");
    for (c, n) in &f.retries {
        let _ = writeln!(out, "railyard_retries_total{{class=\"{c}\"}} {n}");
    }
    out.push_str("# HELP railyard_pool_connections Open connections by state.\n# TYPE railyard_pool_connections gauge\n");
    for p in &f.pools {
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
    for p in &f.pools {
        let _ = writeln!(
            out,
            "railyard_pool_max_connections{{pool=\"{}\"}} {}",
            p.name, p.max_size
        );
    }
    out.push_str("# HELP railyard_pool_checkouts_waited_total Checkouts that had to wait.\n# TYPE railyard_pool_checkouts_waited_total counter\n");
    for p in &f.pools {
        let _ = writeln!(
            out,
            "railyard_pool_checkouts_waited_total{{pool=\"{}\"}} {}",
            p.name, p.gets_waited
        );
    }
    out.push_str("# HELP railyard_pool_checkouts_shed_total Check-outs refused at once because the pool's queue was full or its wait budget passed with every connection in use (load shedding).\n# TYPE railyard_pool_checkouts_shed_total counter\n");
    for p in &f.pools {
        let _ = writeln!(
            out,
            "railyard_pool_checkouts_shed_total{{pool=\"{}\"}} {}",
            p.name, p.shed
        );
    }
    out.push_str("# HELP railyard_pool_waiters Check-outs waiting for a connection now.\n# TYPE railyard_pool_waiters gauge\n");
    for p in &f.pools {
        let _ = writeln!(
            out,
            "railyard_pool_waiters{{pool=\"{}\"}} {}",
            p.name, p.waiters
        );
    }
    out.push_str("# HELP railyard_pool_max_waiters The bound on check-outs waiting for a connection; beyond it they are shed.\n# TYPE railyard_pool_max_waiters gauge\n");
    for p in &f.pools {
        let _ = writeln!(
            out,
            "railyard_pool_max_waiters{{pool=\"{}\"}} {}",
            p.name, p.max_waiters
        );
    }
    out.push_str("# HELP railyard_circuit_open Whether a pool's circuit breaker is open.\n# TYPE railyard_circuit_open gauge\n");
    for p in &f.pools {
        let _ = writeln!(
            out,
            "railyard_circuit_open{{pool=\"{}\"}} {}",
            p.name,
            u8::from(p.circuit_open)
        );
    }
    out.push_str("# HELP railyard_replica_lag_bytes WAL bytes a replica is behind the primary.\n# TYPE railyard_replica_lag_bytes gauge\n");
    for r in &f.replicas {
        let _ = writeln!(
            out,
            "railyard_replica_lag_bytes{{replica=\"{}\"}} {}",
            r.name, r.lag_bytes
        );
    }
    out.push_str("# HELP railyard_replica_healthy Whether a replica serves reads.\n# TYPE railyard_replica_healthy gauge\n");
    for r in &f.replicas {
        let _ = writeln!(
            out,
            "railyard_replica_healthy{{replica=\"{}\"}} {}",
            r.name,
            u8::from(r.status == ReplicaStatus::Healthy)
        );
    }
    out
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
