//! Alerting on what the data layer sees: rules over the watcher's samples,
//! with states (pending, firing, resolved), grouping, deduplication,
//! silences, inhibition, routing by severity, escalation, and channels
//! (`tracing` events, webhooks, commands).
//!
//! Rules come from code ([`Rule`], [`AlertConfig::builtin`]) or from a TOML
//! file ([`AlertConfig::from_file`]; `docs/alerts.md` documents the format
//! and `alerts.example.toml`, beside this crate's manifest, is a complete
//! example). [`Alerts::start`] evaluates every sample a [`Watcher`] takes;
//! notifications go out from bounded queues and never hold up the
//! evaluation. `railyard_http::alerts_router` serves `GET /alerts`,
//! `POST /alerts/silences`, `DELETE /alerts/silences/{id}` and
//! `POST /alerts/ack`.
//!
//! ```no_run
//! # async fn demo(db: railyard::Database) -> Result<(), railyard_ops::Error> {
//! use railyard_ops::alert::{AlertConfig, Alerts};
//! use railyard_ops::watch::{WatchOptions, Watcher};
//! let watcher = Watcher::spawn(db, WatchOptions::default());
//! let alerts = Alerts::start(AlertConfig::from_file("alerts.toml".as_ref())?, &watcher);
//! for a in alerts.view().alerts {
//!     println!("{:?} {}", a.state, a.summary);
//! }
//! # Ok(()) }
//! ```

mod channels;
mod config;
mod engine;
mod rules;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use config::{AlertConfig, ChannelConfig, MAX_CHANNELS, MAX_FILE_LEN, MAX_RULES};
pub use engine::{
    AlertState, AlertView, Grouping, Inhibit, MAX_ALERTS, MAX_LABEL_NAME, MAX_LABEL_VALUE,
    MAX_MATCHERS, MAX_SILENCES, Notification, Silence,
};
pub use rules::{Labels, Metric, Op, Rule, Severity};

use crate::error::Error;
use crate::watch::Watcher;
use railyard::observe::{LatencyBuckets, LatencyCounts, QueryEvent, QueryHook};

/// What `/alerts` answers.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct AlertsView {
    /// Every alert, firing first.
    pub alerts: Vec<AlertView>,
    /// The silences in force.
    pub silences: Vec<Silence>,
    /// Notifications handed to channels since the start.
    pub notifications: u64,
    /// Notifications dropped because a channel's queue was full.
    pub dropped: u64,
}

/// The statement groups of `statement_p99_ms` rules: each query whose text
/// contains a group's text is counted in the group's latency buckets.
#[derive(Debug, Default)]
struct StatementGroups {
    groups: Vec<(String, LatencyBuckets)>,
    /// Snapshots of the last minute, one per sample: the window's start.
    window: Mutex<BTreeMap<String, VecDeque<LatencyCounts>>>,
}

impl StatementGroups {
    fn p99(&self, group: &str) -> Option<f64> {
        let (_, buckets) = self.groups.iter().find(|(g, _)| g == group)?;
        let now = buckets.counts();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let ring = w.entry(group.to_owned()).or_default();
        let p99 = ring
            .front()
            .and_then(|start| now.quantile_since(start, 0.99))
            .map(|d| d.as_secs_f64() * 1000.0);
        if ring.len() >= 60 {
            ring.pop_front();
        }
        ring.push_back(now);
        p99
    }
}

/// The hook that feeds `statement_p99_ms` rules (see [`Alerts::statement_hook`]).
#[derive(Debug, Clone)]
pub struct StatementHook(Arc<StatementGroups>);

impl QueryHook for StatementHook {
    fn on_query(&self, e: &QueryEvent<'_>) {
        for (g, buckets) in &self.0.groups {
            if e.sql.contains(g.as_str()) {
                buckets.record(e.duration);
            }
        }
    }
}

struct Shared {
    engine: Mutex<engine::Engine>,
    channels: Vec<channels::Channel>,
    routes: BTreeMap<Severity, Vec<String>>,
    escalation: Vec<String>,
    statements: Arc<StatementGroups>,
    sent: AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(t) = self.task.get_mut().ok().and_then(Option::take) {
            t.abort();
        }
    }
}

/// The alerting of one process. Clones share it; it stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Alerts(Arc<Shared>);

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field(
                "channels",
                &self.0.channels.iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Alerts {
    /// Starts the channels and evaluates each of `watcher`'s samples (on
    /// the current Tokio runtime): [`Alerts::new`] then [`Alerts::watch`].
    pub fn start(config: AlertConfig, watcher: &Watcher) -> Alerts {
        let alerts = Alerts::new(config);
        alerts.watch(watcher);
        alerts
    }

    /// Evaluates each of `watcher`'s samples from now on (a second call
    /// replaces the first).
    pub fn watch(&self, watcher: &Watcher) {
        let mut samples = watcher.subscribe();
        let weak = Arc::downgrade(&self.0);
        let task = tokio::spawn(async move {
            while samples.changed().await.is_ok() {
                let sample = samples.borrow_and_update().clone();
                let Some(shared) = weak.upgrade() else { break };
                Alerts(shared).evaluate(now_ms(), &sample);
            }
        });
        if let Some(old) = self
            .0
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    /// The alerting without a sampler yet (channels started on the current
    /// Tokio runtime): register [`Alerts::statement_hook`] on the database,
    /// then [`Alerts::watch`] its watcher, or feed it with
    /// [`Alerts::evaluate`].
    pub fn new(config: AlertConfig) -> Alerts {
        let mut channels = vec![channels::Channel::log()];
        for (name, c) in config.channels {
            channels.push(channels::Channel::start(&name, c));
        }
        let groups = config
            .rules
            .iter()
            .filter_map(|r| match &r.metric {
                Metric::StatementP99Ms(g) => Some((g.clone(), LatencyBuckets::default())),
                _ => None,
            })
            .collect();
        let (after, escalation) = match config.escalation {
            Some((after, channels)) => (Some(after), channels),
            None => (None, Vec::new()),
        };
        Alerts(Arc::new(Shared {
            engine: Mutex::new(engine::Engine::new(
                config.rules,
                config.grouping,
                config.inhibits,
                after,
            )),
            channels,
            routes: config.routes,
            escalation,
            statements: Arc::new(StatementGroups {
                groups,
                window: Mutex::default(),
            }),
            sent: AtomicU64::new(0),
            task: Mutex::new(None),
        }))
    }

    /// The hook that measures the statements of `statement_p99_ms` rules;
    /// register it on the database (`DatabaseBuilder::hook`).
    pub fn statement_hook(&self) -> StatementHook {
        StatementHook(self.0.statements.clone())
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, engine::Engine> {
        self.0.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Evaluates one sample at `now_ms` and sends what is due.
    pub fn evaluate(&self, now_ms: u64, sample: &crate::watch::Sample) {
        let statements = self.0.statements.clone();
        let p99 = move |g: &str| statements.p99(g);
        let notes = self.engine().evaluate(now_ms, sample, &p99);
        for n in notes {
            self.dispatch(Arc::new(n));
        }
    }

    fn dispatch(&self, n: Arc<Notification>) {
        let all: Vec<String>;
        let names: &[String] = if n.escalation {
            &self.0.escalation
        } else if let Some(r) = self.0.routes.get(&n.severity) {
            r
        } else {
            all = self
                .0
                .channels
                .iter()
                .map(|c| c.name().to_owned())
                .collect();
            &all
        };
        for c in &self.0.channels {
            if names.iter().any(|n| n == c.name()) {
                c.send(&n);
                self.0.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The alerts, the silences and the counts.
    pub fn view(&self) -> AlertsView {
        let e = self.engine();
        AlertsView {
            alerts: e.alerts(),
            silences: e.silences(),
            notifications: self.0.sent.load(Ordering::Relaxed),
            dropped: self
                .0
                .channels
                .iter()
                .map(|c| c.dropped.load(Ordering::Relaxed))
                .sum(),
        }
    }

    /// Silences the alerts with these labels for `for_`; the silence's id.
    pub fn silence(
        &self,
        matchers: Labels,
        for_: Duration,
        comment: &str,
    ) -> Result<String, Error> {
        if matchers.is_empty() {
            return Err(Error::Alerts(
                "a silence needs at least one matcher (a label and its value, such as rule = replica_lag)".into(),
            ));
        }
        if for_.is_zero() || for_ > Duration::from_secs(30 * 24 * 3600) {
            return Err(Error::Alerts(
                "a silence lasts from a second to 30 days".into(),
            ));
        }
        // Every silence is kept and shown in every view: bounded in bytes too.
        if matchers.len() > MAX_MATCHERS
            || matchers
                .iter()
                .any(|(k, v)| k.len() > MAX_LABEL_NAME || v.len() > MAX_LABEL_VALUE)
        {
            return Err(Error::Alerts(format!(
                "a silence has at most {MAX_MATCHERS} matchers, names of at most {MAX_LABEL_NAME} bytes and values of at most {MAX_LABEL_VALUE}"
            )));
        }
        let comment: String = comment.chars().take(200).collect();
        self.engine()
            .silence(now_ms(), matchers, for_, comment)
            .ok_or_else(|| {
                Error::Alerts(format!(
                    "{MAX_SILENCES} silences are in force already; end one first"
                ))
            })
    }

    /// Ends a silence; whether it was in force.
    ///
    /// (The matcher bounds: [`MAX_MATCHERS`], [`MAX_LABEL_NAME`],
    /// [`MAX_LABEL_VALUE`].)
    pub fn unsilence(&self, id: &str) -> bool {
        self.engine().unsilence(id)
    }

    /// Acknowledges the firing alerts with these labels (which stops their
    /// escalation); how many.
    pub fn acknowledge(&self, labels: &Labels) -> usize {
        self.engine().acknowledge(labels)
    }
}
