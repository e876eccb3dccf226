//! The hooks Railyard ships: [`SlowQueryLog`], [`AuditLog`] and [`QuerySpans`].

use super::*;

/// A `tracing` warning on target `railyard::slow` for queries slower than a threshold.
#[derive(Debug, Clone)]
pub struct SlowQueryLog {
    pub(super) threshold: Duration,
}

impl SlowQueryLog {
    /// Logs queries that take `threshold` or longer.
    pub fn new(threshold: Duration) -> Self {
        SlowQueryLog { threshold }
    }
}

impl QueryHook for SlowQueryLog {
    fn on_query(&self, e: &QueryEvent<'_>) {
        if e.duration >= self.threshold {
            tracing::warn!(
                target: "railyard::slow",
                statement = e.sql,
                duration_ms = e.duration.as_secs_f64() * 1000.0,
                route = %e.route,
                host = e.host,
                port = e.port,
                outcome = ?e.outcome,
                "slow query"
            );
        }
    }
}

/// Data-changing statements on target `railyard::audit`, without values.
#[derive(Debug, Clone, Default)]
pub struct AuditLog;

impl QueryHook for AuditLog {
    fn on_query(&self, e: &QueryEvent<'_>) {
        let changes = matches!(
            e.operation,
            "INSERT"
                | "UPDATE"
                | "DELETE"
                | "MERGE"
                | "TRUNCATE"
                | "CREATE"
                | "ALTER"
                | "DROP"
                | "GRANT"
                | "REVOKE"
                | "COPY"
        );
        if changes {
            tracing::info!(
                target: "railyard::audit",
                operation = e.operation,
                table = e.table.unwrap_or(""),
                statement = e.sql,
                outcome = ?e.outcome,
                sqlstate = e.sqlstate.unwrap_or(""),
                host = e.host,
                database = e.database,
                "data change"
            );
        }
    }
}

/// A `tracing` span per query, named `<operation> <table>` and attributed per
/// OpenTelemetry's database semantic conventions. Inside Railyard's
/// `transaction`, `write` and `read`, the spans are children of the operation's
/// span, whose events record the retries.
#[derive(Debug, Clone, Default)]
pub struct QuerySpans;

impl QueryHook for QuerySpans {
    fn on_query(&self, e: &QueryEvent<'_>) {
        let name = match e.table {
            Some(t) => format!("{} {t}", e.operation),
            None => e.operation.to_owned(),
        };
        let span = tracing::info_span!(
            target: "railyard::query",
            "db.query",
            otel.name = %name,
            otel.kind = "client",
            db.system.name = "postgresql",
            db.namespace = e.database,
            db.operation.name = e.operation,
            db.collection.name = e.table,
            db.query.text = e.sql,
            db.response.status_code = e.sqlstate,
            error.type = e.class.map(ErrorClass::as_str),
            server.address = e.host,
            server.port = e.port,
            db.client.operation.duration = e.duration.as_secs_f64(),
            railyard.route = %e.route,
            railyard.attempt = e.attempt,
        );
        // The span covers the query's result; its duration is recorded as the
        // attribute above (the query began before this hook ran).
        drop(span.enter());
    }
}
