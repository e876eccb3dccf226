//! The per-connection instrumentation: [`Observer`] (a `Database`'s hooks and
//! metrics) installs a [`ConnInstrumentation`] on each connection, which turns
//! diesel's events into [`QueryEvent`]s with their SQLSTATE and repeat counts.

use super::*;

/// The hooks and metrics of one `Database`.
#[derive(Default)]
pub(crate) struct Observer {
    pub(crate) hooks: Vec<Arc<dyn QueryHook>>,
    pub(crate) metrics: Metrics,
    /// Warn when one statement runs this many times in one operation.
    pub(crate) repeats: Option<u32>,
    /// Where slow statements are offered for their plans.
    pub(crate) plans: Option<Arc<PlanStore>>,
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Observer({} hooks)", self.hooks.len())
    }
}

impl Instrument for Observer {
    fn install(
        self: Arc<Self>,
        pg: &mut AsyncPgConnection,
        labels: Arc<ConnLabels>,
        wire: Arc<WireState>,
    ) {
        diesel_async::AsyncConnection::set_instrumentation(
            pg,
            ConnInstrumentation::new(self, labels, wire),
        );
    }
}

/// The instrumentation installed on every connection.
pub(crate) struct ConnInstrumentation {
    pub(super) observer: Arc<Observer>,
    pub(super) labels: Arc<ConnLabels>,
    pub(super) wire: Arc<WireState>,
    /// Queries started and not finished, oldest first: when each started, and
    /// where the connection's traffic stood then (pipelined queries finish in
    /// the order they started). Reused: it grows to the deepest pipeline once.
    pub(super) pending: VecDeque<(Instant, WireMark)>,
    pub(super) depth: u32,
    /// The statement as diesel displays it, up to the binds (reused buffer).
    pub(super) raw: String,
    /// The statement with its literals replaced (reused buffer).
    pub(super) sql: String,
    /// The SQLSTATE of the query being reported (reused buffer).
    pub(super) code: String,
    /// Repeated statements of the current operation (see [`Repeats`]).
    pub(super) repeats: Repeats,
}

impl ConnInstrumentation {
    pub(crate) fn new(
        observer: Arc<Observer>,
        labels: Arc<ConnLabels>,
        wire: Arc<WireState>,
    ) -> Self {
        ConnInstrumentation {
            observer,
            labels,
            wire,
            pending: VecDeque::with_capacity(8),
            depth: 0,
            raw: String::with_capacity(256),
            sql: String::with_capacity(256),
            code: String::with_capacity(8),
            repeats: Repeats::default(),
        }
    }
}

/// The most distinct statements one operation's repeat count keeps.
pub(super) const REPEATS_BOUND: usize = 256;

/// Counts each normalised statement of one operation (a lease, or a
/// top-level transaction within it, or one attempt of a retried one), to warn
/// once when one of them reaches the threshold: the N+1 pattern, a query per
/// row of an earlier result where one query would do.
#[derive(Debug, Default)]
pub(super) struct Repeats {
    pub(super) operation: u64,
    pub(super) attempt: u32,
    pub(super) counts: std::collections::HashMap<String, u32>,
    pub(super) shape: String,
}

impl Repeats {
    pub(super) fn reset(&mut self) {
        self.counts.clear();
    }

    /// Counts `sql` (already literal-free); returns the count when it just
    /// reached `threshold`.
    pub(super) fn count(
        &mut self,
        sql: &str,
        operation: u64,
        attempt: u32,
        threshold: u32,
    ) -> Option<u32> {
        if operation != self.operation || attempt != self.attempt {
            self.operation = operation;
            self.attempt = attempt;
            self.reset();
        }
        self.shape.clear();
        stats::normalize_into(sql, &mut self.shape);
        if !self.counts.contains_key(self.shape.as_str()) {
            if self.counts.len() >= REPEATS_BOUND {
                return None;
            }
            self.counts.insert(self.shape.clone(), 0);
        }
        let n = self.counts.get_mut(self.shape.as_str())?;
        *n += 1;
        (*n == threshold).then_some(*n)
    }
}

/// Writes a query's Display up to diesel's " -- binds: " marker and then stops
/// the formatting, so bind values are never even formatted.
pub(super) struct UntilBinds<'a>(pub(super) &'a mut String, pub(super) bool);

pub(super) const BINDS_MARKER: &str = " -- binds: ";

impl fmt::Write for UntilBinds<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.1 {
            return Err(fmt::Error);
        }
        match s.find(BINDS_MARKER) {
            Some(i) => {
                self.0.push_str(&s[..i]);
                self.1 = true;
                Err(fmt::Error)
            }
            None => {
                self.0.push_str(s);
                Ok(())
            }
        }
    }
}

/// The SQLSTATE of a query that failed with `error` and began at `mark`, into
/// `out` (whether there is one).
///
/// The tap keeps only the latest `ErrorResponse`. It is this query's when it
/// arrived after the query began *and* is the one the driver reports (same
/// message): in a pipeline, the tap may already have read the errors of later
/// queries, and a query can fail in the client after an earlier one failed on
/// the server. Otherwise the driver's own kind names the SQLSTATE for the few
/// kinds it keeps; for the rest there is none rather than another query's.
/// Writes the SQLSTATE of `error` into `out` and returns whether it has one,
/// with the class the tap's full error gives (55P03 needs more than the code).
pub(super) fn sqlstate_of(
    wire: &WireState,
    mark: WireMark,
    error: &DieselError,
    out: &mut String,
    class: &mut Option<ErrorClass>,
) -> bool {
    let DieselError::DatabaseError(kind, info) = error else {
        return false;
    };
    let lost = wire.is_closed();
    let from_tap = wire.with_error_since(mark, |server| {
        let ours = server.message == info.message();
        if ours {
            out.push_str(&server.code);
            *class = Some(server.class(lost));
        }
        ours
    });
    if from_tap == Some(true) {
        return true;
    }
    let code = match kind {
        DatabaseErrorKind::UniqueViolation => "23505",
        DatabaseErrorKind::ForeignKeyViolation => "23503",
        DatabaseErrorKind::NotNullViolation => "23502",
        DatabaseErrorKind::CheckViolation => "23514",
        DatabaseErrorKind::RestrictViolation => "23001",
        DatabaseErrorKind::ExclusionViolation => "23P01",
        DatabaseErrorKind::SerializationFailure => "40001",
        DatabaseErrorKind::ReadOnlyTransaction => "25006",
        _ => return false,
    };
    out.push_str(code);
    true
}

impl ConnInstrumentation {
    /// One statement done: its event, to the metrics, the plan store, the
    /// recording, the repeat detector and the hooks.
    fn finish_query(
        &mut self,
        query: &dyn diesel::connection::DebugQuery,
        error: Option<&diesel::result::Error>,
    ) {
        let Some((start, mark)) = self.pending.pop_front() else {
            return;
        };
        if self.labels.quiet.load(Ordering::Relaxed) {
            return;
        }
        let duration = start.elapsed();
        let (class, coded) = self.error_class(mark, error);
        // The statement's text is for hooks; Railyard's own metrics
        // need only the route, the duration and the class. Without
        // hooks, the text is never formatted.
        let repeats = self.observer.repeats;
        let recording = self.labels.recording.armed();
        let slow_plan = self
            .observer
            .plans
            .as_ref()
            .filter(|p| duration >= p.settings.threshold());
        let hooked = !self.observer.hooks.is_empty()
            || repeats.is_some()
            || recording
            || slow_plan.is_some();
        statement_text(&mut self.raw, &mut self.sql, query, hooked);
        let (operation, table) = if hooked {
            operation_and_table(&self.sql)
        } else {
            ("", None)
        };
        let event = QueryEvent {
            sql: &self.sql,
            operation,
            table,
            duration,
            host: &self.labels.host,
            port: self.labels.port,
            database: &self.labels.database,
            route: &self.labels.route,
            depth: self.depth,
            attempt: self.labels.attempt.load(Ordering::Relaxed).max(1),
            outcome: if error.is_some() {
                Outcome::Error
            } else {
                Outcome::Ok
            },
            class,
            sqlstate: coded.then_some(self.code.as_str()),
        };
        self.observer.metrics.record(&event);
        if let Some(store) = slow_plan
            && error.is_none()
        {
            offer_plan(store, operation, &self.sql, duration);
        }
        let own = matches!(
            operation,
            "BEGIN" | "COMMIT" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" | "SET"
        );
        if recording && !own {
            self.labels.recording.record(&self.sql);
        }
        if let Some(threshold) = repeats
            && !own
        {
            warn_repeats(
                &mut self.repeats,
                &self.sql,
                &self.labels,
                event.attempt,
                threshold,
            );
        }
        for hook in &self.observer.hooks {
            hook.on_query(&event);
        }
    }

    /// The class of a failed statement, and whether its SQLSTATE is in
    /// `self.code`; none for a statement that succeeded.
    fn error_class(
        &mut self,
        mark: WireMark,
        error: Option<&diesel::result::Error>,
    ) -> (Option<ErrorClass>, bool) {
        self.code.clear();
        match error {
            None => (None, false),
            Some(error) => {
                let mut tap_class = None;
                let coded = sqlstate_of(&self.wire, mark, error, &mut self.code, &mut tap_class);
                // A known code is a constant: no allocation.
                let state = coded.then(|| SqlState::from_code(&self.code));
                let class =
                    tap_class.unwrap_or_else(|| classify(state.as_ref(), self.wire.is_closed()));
                (Some(class), coded)
            }
        }
    }
}

/// The statement's text for hooks, in `sql` (its literals hidden), when
/// something will read it; `raw` is the reused buffer it is formatted into.
fn statement_text(
    raw: &mut String,
    sql: &mut String,
    query: &dyn diesel::connection::DebugQuery,
    hooked: bool,
) {
    raw.clear();
    sql.clear();
    if hooked {
        let _ = write!(UntilBinds(raw, false), "{query}");
        sanitize_into(raw.trim(), sql);
    }
}

/// Offers a slow statement's plan to the store, when it can be explained.
fn offer_plan(store: &PlanStore, operation: &str, sql: &str, duration: Duration) {
    if plans::explainable(operation, sql) {
        let mut shape = String::with_capacity(sql.len());
        stats::normalize_into(sql, &mut shape);
        store.offer(sql, &shape, duration);
    }
}

/// Warns when `sql` reached `threshold` runs in the current operation.
fn warn_repeats(
    repeats: &mut Repeats,
    sql: &str,
    labels: &ConnLabels,
    attempt: u32,
    threshold: u32,
) {
    if let Some(n) = repeats.count(
        sql,
        labels.operation.load(Ordering::Relaxed),
        attempt,
        threshold,
    ) {
        tracing::warn!(
            target: "railyard::n_plus_one",
            statement = %repeats.shape,
            count = n,
            route = %labels.route,
            "the same statement ran {n} times in one operation (an N+1 pattern?): fetch the rows in one query"
        );
    }
}

impl Instrumentation for ConnInstrumentation {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::StartQuery { .. } => {
                self.pending.push_back((Instant::now(), self.wire.mark()))
            }
            InstrumentationEvent::FinishQuery { query, error, .. } => {
                self.finish_query(query, error)
            }
            InstrumentationEvent::BeginTransaction { depth, .. } => {
                self.depth = depth.get();
                // Each top-level transaction counts on its own.
                if self.depth == 1 {
                    self.repeats.reset();
                }
            }
            InstrumentationEvent::CommitTransaction { depth, .. }
            | InstrumentationEvent::RollbackTransaction { depth, .. } => {
                self.depth = depth.get() - 1
            }
            _ => {}
        }
    }
}
