//! The alerts' state machine, without I/O or clocks of its own: each sample
//! moves alerts between pending, firing and resolved; grouping, silences,
//! inhibition and escalation decide which notifications go out. Time is
//! passed in (milliseconds), so tests drive it exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::rules::{Labels, Rule, Severity, series};
use crate::watch::Sample;

/// Alerts tracked at most (beyond it new ones are dropped and counted).
pub const MAX_ALERTS: usize = 1000;
/// Silences kept at most.
pub const MAX_SILENCES: usize = 256;
/// Matchers one silence may have.
pub const MAX_MATCHERS: usize = 16;
/// Bytes of a matcher's label name.
pub const MAX_LABEL_NAME: usize = 64;
/// Bytes of a matcher's value.
pub const MAX_LABEL_VALUE: usize = 256;
/// How long a resolved alert stays on the page.
const KEEP_RESOLVED_MS: u64 = 15 * 60 * 1000;

/// An alert's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AlertState {
    /// The rule holds, not yet for its `for` duration.
    Pending,
    /// The rule held for its `for` duration and still holds.
    Firing,
    /// It fired and no longer holds.
    Resolved,
}

/// Which alerts share a notification, and how often groups are notified.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Grouping {
    /// Alerts with the same values of these labels form one group (`rule`
    /// and `severity` are labels of every alert). Default: `["rule"]`.
    pub by: Vec<String>,
    /// A new group waits this long for more alerts before its first
    /// notification (default 1 s).
    pub wait: Duration,
    /// A group that changed is notified again at most this often (default 1 min).
    pub interval: Duration,
    /// A group that did not change is notified again after this (default 4 h).
    pub repeat: Duration,
    /// Notify when a group's alerts resolve (default true).
    pub send_resolved: bool,
}

impl Default for Grouping {
    fn default() -> Self {
        Grouping {
            by: vec!["rule".to_owned()],
            wait: Duration::from_secs(1),
            interval: Duration::from_secs(60),
            repeat: Duration::from_secs(4 * 3600),
            send_resolved: true,
        }
    }
}

/// While an alert matching `source` fires, alerts matching `target` (and
/// equal to it in the `equal` labels) are inhibited: shown, not notified.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Inhibit {
    /// Labels the inhibiting alert has.
    pub source: Labels,
    /// Labels the inhibited alerts have (a value may list alternatives
    /// separated by `|`).
    pub target: Labels,
    /// Labels both must share.
    pub equal: Vec<String>,
}

impl Inhibit {
    /// The built-in inhibition: a primary that is down inhibits the replica
    /// alerts it causes (replicas lag and are ejected when their primary
    /// goes).
    pub fn builtin() -> Vec<Inhibit> {
        vec![Inhibit {
            source: Labels::from([("rule".to_owned(), "primary_down".to_owned())]),
            target: Labels::from([("rule".to_owned(), "replica_lag|replica_ejected".to_owned())]),
            equal: Vec::new(),
        }]
    }
}

/// A silence: alerts matching it are not notified until it ends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Silence {
    /// Its id.
    pub id: String,
    /// Labels an alert must have (values may list alternatives with `|`).
    pub matchers: Labels,
    /// When it ends, ms since 1970.
    pub until_ms: u64,
    /// Why.
    pub comment: String,
}

/// An alert as the page and `/alerts` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct AlertView {
    /// The rule.
    pub rule: String,
    /// Its labels (the rule's, the series', `rule` and `severity`).
    pub labels: Labels,
    /// How urgent.
    pub severity: Severity,
    /// Pending, firing or resolved.
    pub state: AlertState,
    /// When it entered its state, ms since 1970.
    pub since_ms: u64,
    /// The metric's last value.
    pub value: f64,
    /// In words.
    pub summary: String,
    /// A silence matches it.
    pub silenced: bool,
    /// A firing alert inhibits it.
    pub inhibited: bool,
    /// Someone acknowledged it.
    pub acknowledged: bool,
    /// It was escalated.
    pub escalated: bool,
}

/// One notification: a group's alerts, or the alerts escalated at once.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Notification {
    /// The group's labels (empty for an escalation).
    pub group: Labels,
    /// `firing` when any alert in it fires, else `resolved`.
    pub status: AlertState,
    /// The highest severity in it.
    pub severity: Severity,
    /// An escalation: firing alerts nobody acknowledged in time.
    pub escalation: bool,
    /// The alerts.
    pub alerts: Vec<AlertView>,
    /// When, ms since 1970.
    pub at_ms: u64,
}

#[derive(Debug)]
struct Alert {
    rule: usize,
    labels: Labels,
    state: AlertState,
    since_ms: u64,
    fired_ms: u64,
    value: f64,
    acknowledged: bool,
    escalated: bool,
    resolved_notified: bool,
}

#[derive(Debug, Default)]
struct GroupState {
    first_seen_ms: u64,
    last_sent_ms: Option<u64>,
    /// The firing alerts as last notified.
    last: Vec<String>,
}

/// The engine.
#[derive(Debug)]
pub(crate) struct Engine {
    rules: Vec<Rule>,
    grouping: Grouping,
    inhibits: Vec<Inhibit>,
    escalate_after: Option<Duration>,
    alerts: BTreeMap<(usize, Labels), Alert>,
    groups: BTreeMap<Vec<String>, GroupState>,
    silences: Vec<Silence>,
    next_silence: u64,
    /// Alerts not tracked because of [`MAX_ALERTS`].
    pub(crate) dropped: u64,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Whether `labels` has every matcher (a matcher's value may list
/// alternatives separated by `|`).
fn matches(matchers: &Labels, labels: &Labels) -> bool {
    matchers.iter().all(|(k, v)| {
        labels
            .get(k)
            .is_some_and(|have| v.split('|').any(|alt| alt == have))
    })
}

impl Engine {
    pub(crate) fn new(
        rules: Vec<Rule>,
        grouping: Grouping,
        inhibits: Vec<Inhibit>,
        escalate_after: Option<Duration>,
    ) -> Self {
        Engine {
            rules,
            grouping,
            inhibits,
            escalate_after,
            alerts: BTreeMap::new(),
            groups: BTreeMap::new(),
            silences: Vec::new(),
            next_silence: 1,
            dropped: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Moves the alerts on with a new sample and returns what to notify.
    pub(crate) fn evaluate(
        &mut self,
        now: u64,
        sample: &Sample,
        statement_p99: &dyn Fn(&str) -> Option<f64>,
    ) -> Vec<Notification> {
        let mut holding: BTreeMap<(usize, Labels), f64> = BTreeMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            for (series_labels, v) in series(&rule.metric, sample, statement_p99) {
                if rule.op.holds(v) {
                    let mut labels = rule.labels.clone();
                    labels.extend(series_labels);
                    labels.insert("rule".into(), rule.name.clone());
                    labels.insert("severity".into(), rule.severity.as_str().into());
                    holding.insert((i, labels), v);
                }
            }
        }
        self.observe(now, holding)
    }

    /// The state machine proper, from the series that hold now.
    pub(crate) fn observe(
        &mut self,
        now: u64,
        holding: BTreeMap<(usize, Labels), f64>,
    ) -> Vec<Notification> {
        self.silences.retain(|s| s.until_ms > now);
        // Alerts that stopped holding.
        self.alerts.retain(|key, a| {
            if holding.contains_key(key) {
                return true;
            }
            match a.state {
                AlertState::Pending => false,
                AlertState::Firing => {
                    a.state = AlertState::Resolved;
                    a.since_ms = now;
                    true
                }
                AlertState::Resolved => now.saturating_sub(a.since_ms) < KEEP_RESOLVED_MS,
            }
        });
        // Alerts that hold.
        for (key, value) in holding {
            let for_ = ms(self.rules[key.0].for_);
            let len = self.alerts.len();
            let a = match self.alerts.get_mut(&key) {
                Some(a) => a,
                None if len >= MAX_ALERTS => {
                    self.dropped += 1;
                    continue;
                }
                None => self.alerts.entry(key.clone()).or_insert(Alert {
                    rule: key.0,
                    labels: key.1.clone(),
                    state: AlertState::Pending,
                    since_ms: now,
                    fired_ms: 0,
                    value,
                    acknowledged: false,
                    escalated: false,
                    resolved_notified: false,
                }),
            };
            if a.state == AlertState::Resolved {
                // It holds again: a new episode.
                a.state = AlertState::Pending;
                a.since_ms = now;
                a.fired_ms = 0;
                a.acknowledged = false;
                a.escalated = false;
                a.resolved_notified = false;
            }
            a.value = value;
            if a.state == AlertState::Pending && now.saturating_sub(a.since_ms) >= for_ {
                a.state = AlertState::Firing;
                a.since_ms = now;
                a.fired_ms = now;
            }
        }
        let mut out = self.group_notifications(now);
        out.extend(self.escalations(now));
        out
    }

    fn silenced(&self, a: &Alert) -> bool {
        self.silences
            .iter()
            .any(|s| matches(&s.matchers, &a.labels))
    }

    fn inhibited(&self, a: &Alert) -> bool {
        self.inhibits.iter().any(|rule| {
            matches(&rule.target, &a.labels)
                && self.alerts.values().any(|src| {
                    src.state == AlertState::Firing
                        && !std::ptr::eq(src, a)
                        && matches(&rule.source, &src.labels)
                        && rule
                            .equal
                            .iter()
                            .all(|k| src.labels.get(k) == a.labels.get(k))
                })
        })
    }

    fn view(&self, a: &Alert) -> AlertView {
        let rule = &self.rules[a.rule];
        let series: Vec<String> = a
            .labels
            .iter()
            .filter(|(k, _)| !rule.labels.contains_key(*k) && *k != "rule" && *k != "severity")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let (word, t) = match rule.op {
            super::rules::Op::Above(t) => ("above", t),
            super::rules::Op::Below(t) => ("below", t),
        };
        AlertView {
            rule: rule.name.clone(),
            labels: a.labels.clone(),
            severity: rule.severity,
            state: a.state,
            since_ms: a.since_ms,
            value: a.value,
            summary: format!(
                "{}{}: {} is {} ({word} {t})",
                rule.name,
                if series.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", series.join(", "))
                },
                rule.metric.name(),
                round(a.value),
            ),
            silenced: self.silenced(a),
            inhibited: self.inhibited(a),
            acknowledged: a.acknowledged,
            escalated: a.escalated,
        }
    }

    fn group_key(&self, a: &Alert) -> Vec<String> {
        self.grouping
            .by
            .iter()
            .map(|k| a.labels.get(k).cloned().unwrap_or_default())
            .collect()
    }

    // Long by design: grouping, inhibition and repeat are one pass over the firing set.
    fn group_notifications(&mut self, now: u64) -> Vec<Notification> {
        // Each group's content: firing alerts, and resolved ones not yet
        // notified; silenced and inhibited ones stay out.
        let mut content: BTreeMap<Vec<String>, Vec<(usize, Labels)>> = BTreeMap::new();
        for (key, a) in &self.alerts {
            let due = match a.state {
                AlertState::Firing => true,
                AlertState::Resolved => self.grouping.send_resolved && !a.resolved_notified,
                AlertState::Pending => false,
            };
            if due && !self.silenced(a) && !self.inhibited(a) {
                content
                    .entry(self.group_key(a))
                    .or_default()
                    .push(key.clone());
            }
        }
        self.groups.retain(|g, _| content.contains_key(g));
        let mut out = Vec::new();
        for (group, keys) in content {
            let state = self.groups.entry(group.clone()).or_insert(GroupState {
                first_seen_ms: now,
                ..GroupState::default()
            });
            let fingerprint: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{:?}:{:?}", k.0, k.1, self.alerts[k].state))
                .collect();
            let firing_now: Vec<String> = keys
                .iter()
                .filter(|k| self.alerts[*k].state == AlertState::Firing)
                .map(|k| format!("{}:{:?}:{:?}", k.0, k.1, AlertState::Firing))
                .collect();
            let send = match state.last_sent_ms {
                None => now.saturating_sub(state.first_seen_ms) >= ms(self.grouping.wait),
                Some(last) if fingerprint != state.last => {
                    now.saturating_sub(last) >= ms(self.grouping.interval)
                }
                Some(last) => {
                    !firing_now.is_empty() && now.saturating_sub(last) >= ms(self.grouping.repeat)
                }
            };
            if !send {
                continue;
            }
            state.last_sent_ms = Some(now);
            state.last = firing_now;
            let alerts: Vec<AlertView> = keys.iter().map(|k| self.view(&self.alerts[k])).collect();
            let labels: Labels = self
                .grouping
                .by
                .iter()
                .cloned()
                .zip(group.iter().cloned())
                .collect();
            for k in &keys {
                if let Some(a) = self.alerts.get_mut(k)
                    && a.state == AlertState::Resolved
                {
                    a.resolved_notified = true;
                }
            }
            out.push(Notification {
                group: labels,
                status: if alerts.iter().any(|a| a.state == AlertState::Firing) {
                    AlertState::Firing
                } else {
                    AlertState::Resolved
                },
                severity: alerts
                    .iter()
                    .map(|a| a.severity)
                    .max()
                    .unwrap_or(Severity::Info),
                escalation: false,
                alerts,
                at_ms: now,
            });
        }
        out
    }

    fn escalations(&mut self, now: u64) -> Vec<Notification> {
        let Some(after) = self.escalate_after else {
            return Vec::new();
        };
        let due: Vec<(usize, Labels)> = self
            .alerts
            .iter()
            .filter(|(_, a)| {
                a.state == AlertState::Firing
                    && !a.acknowledged
                    && !a.escalated
                    && now.saturating_sub(a.fired_ms) >= ms(after)
                    && !self.silenced(a)
                    && !self.inhibited(a)
            })
            .map(|(k, _)| k.clone())
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        for k in &due {
            if let Some(a) = self.alerts.get_mut(k) {
                a.escalated = true;
            }
        }
        let alerts: Vec<AlertView> = due.iter().map(|k| self.view(&self.alerts[k])).collect();
        vec![Notification {
            group: Labels::new(),
            status: AlertState::Firing,
            severity: alerts
                .iter()
                .map(|a| a.severity)
                .max()
                .unwrap_or(Severity::Info),
            escalation: true,
            alerts,
            at_ms: now,
        }]
    }

    /// Every alert, firing first.
    pub(crate) fn alerts(&self) -> Vec<AlertView> {
        let mut v: Vec<AlertView> = self.alerts.values().map(|a| self.view(a)).collect();
        let rank = |s: AlertState| match s {
            AlertState::Firing => 0,
            AlertState::Pending => 1,
            AlertState::Resolved => 2,
        };
        v.sort_by(|a, b| {
            rank(a.state)
                .cmp(&rank(b.state))
                .then(b.severity.cmp(&a.severity))
                .then(a.rule.cmp(&b.rule))
        });
        v
    }

    pub(crate) fn silences(&self) -> Vec<Silence> {
        self.silences.clone()
    }

    /// Adds a silence; refused (None) when there are [`MAX_SILENCES`].
    pub(crate) fn silence(
        &mut self,
        now: u64,
        matchers: Labels,
        for_: Duration,
        comment: String,
    ) -> Option<String> {
        self.silences.retain(|s| s.until_ms > now);
        if self.silences.len() >= MAX_SILENCES {
            return None;
        }
        let id = format!("s{}", self.next_silence);
        self.next_silence += 1;
        self.silences.push(Silence {
            id: id.clone(),
            matchers,
            until_ms: now.saturating_add(ms(for_)),
            comment,
        });
        Some(id)
    }

    /// Ends a silence; whether it existed.
    pub(crate) fn unsilence(&mut self, id: &str) -> bool {
        let before = self.silences.len();
        self.silences.retain(|s| s.id != id);
        self.silences.len() != before
    }

    /// Acknowledges the firing alerts with these labels (all of them, for
    /// an empty set); how many.
    pub(crate) fn acknowledge(&mut self, labels: &Labels) -> usize {
        let mut n = 0;
        for a in self.alerts.values_mut() {
            if a.state == AlertState::Firing && matches(labels, &a.labels) {
                a.acknowledged = true;
                n += 1;
            }
        }
        n
    }
}

fn round(v: f64) -> String {
    if (v.fract() == 0.0 && v.abs() < 1e15) || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::{Metric, Op};
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The labels the engine gives an alert of `rule` on `series`.
    fn key(e: &Engine, rule: usize, series: &[(&str, &str)]) -> (usize, Labels) {
        let r = &e.rules()[rule];
        let mut l = labels(series);
        l.insert("rule".into(), r.name.clone());
        l.insert("severity".into(), r.severity.as_str().into());
        (rule, l)
    }

    fn engine(grouping: Grouping, escalate: Option<Duration>) -> Engine {
        Engine::new(
            vec![
                Rule::new("primary_down", Metric::PrimaryDown, Op::Above(0.0))
                    .severity(Severity::Critical),
                Rule::new("replica_lag", Metric::ReplicaLagSeconds, Op::Above(5.0))
                    .for_duration(Duration::from_secs(3)),
                Rule::new("replica_ejected", Metric::ReplicaEjected, Op::Above(0.0)),
            ],
            grouping,
            Inhibit::builtin(),
            escalate,
        )
    }

    fn step(e: &mut Engine, now: u64, holding: &[((usize, Labels), f64)]) -> Vec<Notification> {
        e.observe(now, holding.iter().cloned().collect())
    }

    #[test]
    fn an_alert_is_pending_for_its_duration_then_fires_once_per_group_and_resolves() {
        let mut e = engine(Grouping::default(), None);
        let r1 = key(&e, 1, &[("replica", "r1")]);
        let r2 = key(&e, 1, &[("replica", "r2")]);
        assert!(step(&mut e, 0, &[(r1.clone(), 9.0)]).is_empty());
        assert_eq!(e.alerts()[0].state, AlertState::Pending);
        assert!(step(&mut e, 1000, &[(r1.clone(), 9.0), (r2.clone(), 7.0)]).is_empty());
        // r1 fires at 3 s; the group waits 1 s for more.
        assert!(step(&mut e, 3000, &[(r1.clone(), 9.0), (r2.clone(), 7.0)]).is_empty());
        // r2 fires at 4 s and joins the same group: one notification, two alerts.
        let n = step(&mut e, 4000, &[(r1.clone(), 9.0), (r2.clone(), 7.0)]);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(n[0].alerts.len(), 2);
        assert_eq!(n[0].status, AlertState::Firing);
        assert_eq!(n[0].group, labels(&[("rule", "replica_lag")]));
        // The same state again: deduplicated, nothing sent.
        for t in (5000..60_000).step_by(1000) {
            assert!(step(&mut e, t, &[(r1.clone(), 9.5), (r2.clone(), 8.0)]).is_empty());
        }
        // Both resolve: one resolved notification (after the group interval).
        let mut resolved = Vec::new();
        for t in (61_000..130_000).step_by(1000) {
            resolved.extend(step(&mut e, t, &[]));
        }
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert_eq!(resolved[0].status, AlertState::Resolved);
        assert!(e.alerts().iter().all(|a| a.state == AlertState::Resolved));
        // A repeat after the repeat interval, for a group still firing.
        let mut e = engine(
            Grouping {
                repeat: Duration::from_secs(10),
                wait: Duration::ZERO,
                ..Grouping::default()
            },
            None,
        );
        let ej = key(&e, 2, &[("replica", "r1")]);
        assert_eq!(step(&mut e, 0, &[(ej.clone(), 1.0)]).len(), 1);
        assert!(step(&mut e, 5000, &[(ej.clone(), 1.0)]).is_empty());
        assert_eq!(step(&mut e, 10_000, &[(ej.clone(), 1.0)]).len(), 1);
    }

    #[test]
    fn a_silence_keeps_matching_alerts_from_notifications_until_it_ends() {
        let mut e = engine(
            Grouping {
                wait: Duration::ZERO,
                ..Grouping::default()
            },
            None,
        );
        let ej = key(&e, 2, &[("replica", "r1")]);
        let id = e
            .silence(
                0,
                labels(&[("rule", "replica_ejected")]),
                Duration::from_secs(60),
                "maintenance".into(),
            )
            .unwrap();
        assert!(step(&mut e, 0, &[(ej.clone(), 1.0)]).is_empty());
        let v = e.alerts();
        assert!(v[0].silenced && v[0].state == AlertState::Firing, "{v:?}");
        assert!(step(&mut e, 30_000, &[(ej.clone(), 1.0)]).is_empty());
        // It ends: the alert is notified.
        assert_eq!(step(&mut e, 60_000, &[(ej.clone(), 1.0)]).len(), 1);
        assert!(!e.unsilence(&id), "expired silences are gone");
        let id = e
            .silence(
                60_000,
                labels(&[("replica", "r9|r1")]),
                Duration::from_secs(60),
                String::new(),
            )
            .unwrap();
        assert!(e.alerts()[0].silenced);
        assert!(e.unsilence(&id));
        assert!(!e.alerts()[0].silenced);
        for i in 0..MAX_SILENCES + 5 {
            let _ = e.silence(
                61_000,
                Labels::new(),
                Duration::from_secs(60),
                i.to_string(),
            );
        }
        assert_eq!(e.silences().len(), MAX_SILENCES);
    }

    #[test]
    fn a_primary_that_is_down_inhibits_the_replica_alerts_it_causes() {
        let mut e = engine(
            Grouping {
                wait: Duration::ZERO,
                ..Grouping::default()
            },
            None,
        );
        let down = key(&e, 0, &[]);
        let ej = key(&e, 2, &[("replica", "r1")]);
        let n = step(&mut e, 0, &[(down.clone(), 1.0), (ej.clone(), 1.0)]);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(n[0].alerts[0].rule, "primary_down");
        let ejected = e
            .alerts()
            .into_iter()
            .find(|a| a.rule == "replica_ejected")
            .unwrap();
        assert!(ejected.inhibited && ejected.state == AlertState::Firing);
        // The primary comes back; the replica is still ejected: now notified.
        let n = step(&mut e, 1000, &[(ej.clone(), 1.0)]);
        let rules: Vec<&str> = n.iter().map(|n| n.alerts[0].rule.as_str()).collect();
        assert_eq!(rules, ["replica_ejected"], "{n:?}");
    }

    #[test]
    fn an_alert_nobody_acknowledges_is_escalated_once_and_an_acknowledged_one_never() {
        let mut e = engine(
            Grouping {
                wait: Duration::ZERO,
                ..Grouping::default()
            },
            Some(Duration::from_secs(300)),
        );
        let r1 = key(&e, 2, &[("replica", "r1")]);
        let r2 = key(&e, 2, &[("replica", "r2")]);
        let both = [(r1.clone(), 1.0), (r2.clone(), 1.0)];
        assert_eq!(step(&mut e, 0, &both).len(), 1);
        assert_eq!(e.acknowledge(&labels(&[("replica", "r2")])), 1);
        assert!(step(&mut e, 299_000, &both).is_empty());
        let n = step(&mut e, 300_000, &both);
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(n[0].escalation);
        assert_eq!(n[0].alerts.len(), 1);
        assert_eq!(n[0].alerts[0].labels["replica"], "r1");
        assert!(step(&mut e, 400_000, &both).is_empty());
    }

    #[test]
    fn alerts_are_bounded() {
        let mut e = engine(Grouping::default(), None);
        let many: Vec<((usize, Labels), f64)> = (0..MAX_ALERTS + 10)
            .map(|i| (key(&e, 2, &[("replica", &i.to_string())]), 1.0))
            .collect();
        step(&mut e, 0, &many);
        assert_eq!(e.alerts().len(), MAX_ALERTS);
        assert_eq!(e.dropped, 10);
    }
}
