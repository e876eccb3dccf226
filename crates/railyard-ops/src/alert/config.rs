//! The alert rules file (TOML): rules, grouping, inhibitions, routes by
//! severity, escalation and channels. Errors name the rule or field and what
//! to do; they never repeat a string from the file (a webhook URL may carry a
//! token), only names.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::engine::{Grouping, Inhibit};
use super::rules::{Labels, Metric, Op, Rule, Severity};
use crate::error::Error;

/// The largest rules file read.
pub const MAX_FILE_LEN: u64 = 1024 * 1024;
/// Rules at most.
pub const MAX_RULES: usize = 256;
/// Channels at most.
pub const MAX_CHANNELS: usize = 32;

/// Where notifications go.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub enum ChannelConfig {
    /// An HTTP POST of the notification as JSON, retried with backoff.
    Webhook {
        /// `http://` or `https://` URL (it may hold a token: never printed).
        url: String,
        /// Each attempt's bound.
        timeout: Duration,
        /// Attempts at most.
        attempts: u32,
    },
    /// A program run with the notification as JSON on its standard input.
    Command {
        /// The program.
        program: std::path::PathBuf,
        /// Its arguments.
        args: Vec<String>,
        /// Killed after this.
        timeout: Duration,
    },
}

impl std::fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The URL's path and query may be a secret (chat webhooks carry
            // their token there): only the scheme and host are shown.
            ChannelConfig::Webhook {
                url,
                timeout,
                attempts,
            } => f
                .debug_struct("Webhook")
                .field("url", &super::channels::redacted_url(url))
                .field("timeout", timeout)
                .field("attempts", attempts)
                .finish(),
            ChannelConfig::Command {
                program, timeout, ..
            } => f
                .debug_struct("Command")
                .field("program", program)
                .field("args", &"…")
                .field("timeout", timeout)
                .finish(),
        }
    }
}

/// Everything the alerting needs, from a file ([`AlertConfig::from_toml`])
/// or by code.
///
/// ```
/// use std::time::Duration;
/// use railyard_ops::alert::{AlertConfig, Metric, Op, Rule, Severity};
/// let mut config = AlertConfig::builtin();
/// config.rules.push(
///     Rule::new("orders_slow", Metric::StatementP99Ms("FROM orders".into()), Op::Above(50.0))
///         .for_duration(Duration::from_secs(60)),
/// );
/// assert!(config.rules.iter().any(|r| r.name == "replica_lag"));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AlertConfig {
    /// The rules.
    pub rules: Vec<Rule>,
    /// Grouping and notification pacing.
    pub grouping: Grouping,
    /// Inhibitions.
    pub inhibits: Vec<Inhibit>,
    /// Channels by severity; a severity with no route goes to every channel.
    pub routes: BTreeMap<Severity, Vec<String>>,
    /// Escalation: after how long an unacknowledged firing alert goes to
    /// which channels.
    pub escalation: Option<(Duration, Vec<String>)>,
    /// The channels by name (`log` is always there: `tracing` events).
    pub channels: BTreeMap<String, ChannelConfig>,
}

impl AlertConfig {
    /// The built-in rules and inhibition, notifications as `tracing` events.
    pub fn builtin() -> Self {
        AlertConfig {
            rules: Rule::builtin(),
            grouping: Grouping::default(),
            inhibits: Inhibit::builtin(),
            routes: BTreeMap::new(),
            escalation: None,
            channels: BTreeMap::new(),
        }
    }

    /// Reads a rules file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let fail = |what: String| Error::Alerts(format!("{}: {what}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        if meta.len() > MAX_FILE_LEN {
            return Err(fail(format!(
                "{} bytes; a rules file has at most {MAX_FILE_LEN}",
                meta.len()
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Alerts(m) => fail(m),
            other => other,
        })
    }

    /// Parses the rules file's text. See `docs/alerts.md` for the format.
    ///
    /// ```
    /// let config = railyard_ops::alert::AlertConfig::from_toml(r#"
    ///     [[rule]]
    ///     name = "replica_lag_bytes"
    ///     metric = "replica_lag_bytes"
    ///     above = 1048576
    ///     for = "5s"
    ///     severity = "critical"
    /// "#).unwrap();
    /// assert!(config.rules.iter().any(|r| r.name == "replica_lag_bytes"));
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            Error::Alerts(format!(
                "{}{}",
                line.map(|l| format!("line {l}: ")).unwrap_or_default(),
                without_strings(e.message())
            ))
        })?;
        file.into_config()
    }
}

/// A message with every double-quoted string replaced by `"…"`: parse errors
/// quote values, and a value may be a secret.
fn without_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for ch in message.chars() {
        if ch == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(ch);
        }
    }
    if inside {
        out.push('…');
    }
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "yes")]
    builtin: bool,
    #[serde(default = "yes")]
    builtin_inhibit: bool,
    #[serde(default)]
    rule: Vec<RuleFile>,
    #[serde(default)]
    grouping: Option<GroupingFile>,
    #[serde(default)]
    inhibit: Vec<InhibitFile>,
    #[serde(default)]
    route: Vec<RouteFile>,
    #[serde(default)]
    escalation: Option<EscalationFile>,
    #[serde(default)]
    channel: BTreeMap<String, ChannelFile>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    metric: String,
    above: Option<f64>,
    below: Option<f64>,
    #[serde(rename = "for")]
    for_: Option<String>,
    severity: Option<String>,
    #[serde(default)]
    labels: Labels,
    statement: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupingFile {
    by: Option<Vec<String>>,
    wait: Option<String>,
    interval: Option<String>,
    repeat: Option<String>,
    send_resolved: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InhibitFile {
    source: Labels,
    target: Labels,
    #[serde(default)]
    equal: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    severity: String,
    channels: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EscalationFile {
    after: String,
    channels: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
enum ChannelFile {
    Webhook {
        url: String,
        timeout: Option<String>,
        attempts: Option<u32>,
    },
    Command {
        program: std::path::PathBuf,
        #[serde(default)]
        args: Vec<String>,
        timeout: Option<String>,
    },
}

fn duration(what: &str, text: Option<&str>, default: Duration) -> Result<Duration, Error> {
    let Some(text) = text else { return Ok(default) };
    let d = humantime::parse_duration(text.trim()).map_err(|_| {
        Error::Alerts(format!(
            "{what}: not a duration; write a number and a unit, such as 30s, 5m or 500ms"
        ))
    })?;
    if d > Duration::from_secs(365 * 24 * 3600) {
        return Err(Error::Alerts(format!("{what}: at most a year")));
    }
    Ok(d)
}

fn severity(what: &str, s: &str) -> Result<Severity, Error> {
    Severity::parse(s).ok_or_else(|| {
        Error::Alerts(format!(
            "{what}: severity must be info, warning or critical"
        ))
    })
}

fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl File {
    fn into_config(self) -> Result<AlertConfig, Error> {
        let channels = channels(self.channel)?;
        let (routes, escalation) = routes(self.route, self.escalation, &channels)?;
        Ok(AlertConfig {
            rules: rules(self.builtin, self.rule)?,
            grouping: grouping(self.grouping)?,
            inhibits: inhibits(self.builtin_inhibit, self.inhibit)?,
            routes,
            escalation,
            channels,
        })
    }
}

/// The built-in rules (unless turned off) with the file's, which replace built-ins of their name.
fn rules(builtin: bool, file: Vec<RuleFile>) -> Result<Vec<Rule>, Error> {
    let mut rules = if builtin { Rule::builtin() } else { Vec::new() };
    if file.len() > MAX_RULES {
        return Err(Error::Alerts(format!(
            "{} rules; at most {MAX_RULES}",
            file.len()
        )));
    }
    for (i, r) in file.into_iter().enumerate() {
        if !name_ok(&r.name) {
            return Err(Error::Alerts(format!(
                "rule {}: name: use 1 to 64 letters, digits, _ or -",
                i + 1
            )));
        }
        let what = format!("rule {:?}", r.name);
        let metric = Metric::parse(&r.metric, r.statement.clone()).ok_or_else(|| {
            Error::Alerts(if r.metric == "statement_p99_ms" {
                format!(
                    "{what}: statement_p99_ms needs `statement`, a part of the statements' text"
                )
            } else {
                format!(
                    "{what}: metric: unknown; one of {}",
                    Metric::NAMES.join(", ")
                )
            })
        })?;
        if r.statement.is_some() && !matches!(metric, Metric::StatementP99Ms(_)) {
            return Err(Error::Alerts(format!(
                "{what}: `statement` is for statement_p99_ms only"
            )));
        }
        let op = match (r.above, r.below) {
            (Some(t), None) if t.is_finite() => Op::Above(t),
            (None, Some(t)) if t.is_finite() => Op::Below(t),
            (Some(_), Some(_)) => {
                return Err(Error::Alerts(format!(
                    "{what}: give `above` or `below`, not both"
                )));
            }
            _ => {
                return Err(Error::Alerts(format!(
                    "{what}: give a finite threshold as `above = …` or `below = …`"
                )));
            }
        };
        let rule = Rule {
            for_: duration(&format!("{what}: for"), r.for_.as_deref(), Duration::ZERO)?,
            severity: match &r.severity {
                Some(s) => severity(&what, s)?,
                None => Severity::Warning,
            },
            labels: r.labels,
            ..Rule::new(r.name.clone(), metric, op)
        };
        // A rule of a built-in's name replaces it.
        rules.retain(|b| b.name != rule.name);
        rules.push(rule);
    }
    Ok(rules)
}

/// How notifications are grouped: the defaults, with what the file sets.
fn grouping(file: Option<GroupingFile>) -> Result<Grouping, Error> {
    let grouping = match file {
        None => Grouping::default(),
        Some(g) => {
            let d = Grouping::default();
            Grouping {
                by: g.by.unwrap_or(d.by),
                wait: duration("grouping: wait", g.wait.as_deref(), d.wait)?,
                interval: duration("grouping: interval", g.interval.as_deref(), d.interval)?,
                repeat: duration("grouping: repeat", g.repeat.as_deref(), d.repeat)?,
                send_resolved: g.send_resolved.unwrap_or(d.send_resolved),
            }
        }
    };
    Ok(grouping)
}

/// The built-in inhibitions (unless turned off) and the file's.
fn inhibits(builtin: bool, file: Vec<InhibitFile>) -> Result<Vec<Inhibit>, Error> {
    let mut inhibits = if builtin {
        Inhibit::builtin()
    } else {
        Vec::new()
    };
    for (i, inh) in file.into_iter().enumerate() {
        if inh.source.is_empty() || inh.target.is_empty() {
            return Err(Error::Alerts(format!(
                "inhibit {}: source and target need at least one label each",
                i + 1
            )));
        }
        inhibits.push(Inhibit {
            source: inh.source,
            target: inh.target,
            equal: inh.equal,
        });
    }
    Ok(inhibits)
}

/// The named channels, each checked (`log` is built in).
fn channels(file: BTreeMap<String, ChannelFile>) -> Result<BTreeMap<String, ChannelConfig>, Error> {
    if file.len() > MAX_CHANNELS {
        return Err(Error::Alerts(format!(
            "{} channels; at most {MAX_CHANNELS}",
            file.len()
        )));
    }
    let mut channels = BTreeMap::new();
    for (name, c) in file {
        if !name_ok(&name) || name == "log" {
            return Err(Error::Alerts(
                "a channel's name: use 1 to 64 letters, digits, _ or - (and not `log`, the built-in one)"
                    .to_owned(),
            ));
        }
        let what = format!("channel {name:?}");
        let c = match c {
            ChannelFile::Webhook {
                url,
                timeout,
                attempts,
            } => {
                super::channels::parse_url(&url)
                    .map_err(|why| Error::Alerts(format!("{what}: url: {why}")))?;
                ChannelConfig::Webhook {
                    url,
                    timeout: duration(
                        &format!("{what}: timeout"),
                        timeout.as_deref(),
                        Duration::from_secs(5),
                    )?,
                    attempts: attempts.unwrap_or(5).clamp(1, 20),
                }
            }
            ChannelFile::Command {
                program,
                args,
                timeout,
            } => ChannelConfig::Command {
                program,
                args,
                timeout: duration(
                    &format!("{what}: timeout"),
                    timeout.as_deref(),
                    Duration::from_secs(10),
                )?,
            },
        };
        channels.insert(name, c);
    }
    Ok(channels)
}

/// Channels by severity.
type Routes = BTreeMap<Severity, Vec<String>>;
/// How long an alert fires before it escalates, and to which channels.
type Escalation = Option<(Duration, Vec<String>)>;

/// Routes by severity and the escalation, naming only channels that exist.
fn routes(
    route: Vec<RouteFile>,
    escalation: Option<EscalationFile>,
    channels: &BTreeMap<String, ChannelConfig>,
) -> Result<(Routes, Escalation), Error> {
    let known = |what: &str, list: &[String]| -> Result<(), Error> {
        for c in list {
            if c != "log" && !channels.contains_key(c) {
                return Err(Error::Alerts(format!(
                    "{what}: no channel named {c:?}; define it under [channel.NAME] or use `log`"
                )));
            }
        }
        Ok(())
    };
    let mut routes = BTreeMap::new();
    for r in route {
        let s = severity("route", &r.severity)?;
        known(&format!("route {:?}", r.severity), &r.channels)?;
        routes.insert(s, r.channels);
    }
    let escalation = match escalation {
        None => None,
        Some(e) => {
            known("escalation", &e.channels)?;
            Some((
                duration("escalation: after", Some(&e.after), Duration::ZERO)?,
                e.channels,
            ))
        }
    };
    Ok((routes, escalation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../../alerts.example.toml");

    #[test]
    fn the_documented_example_parses() {
        let c = AlertConfig::from_toml(EXAMPLE).unwrap();
        assert!(c.rules.iter().any(|r| r.name == "orders_p99"));
        assert!(c.rules.iter().any(|r| r.name == "primary_down"));
        assert!(c.channels.contains_key("oncall"));
        assert!(c.escalation.is_some());
        assert_eq!(c.routes[&Severity::Critical], ["log", "oncall", "pager"]);
    }

    #[test]
    fn mistakes_are_named() {
        let err = |t: &str| AlertConfig::from_toml(t).unwrap_err().to_string();
        assert!(
            err("[[rule]]\nname = \"x\"\nmetric = \"nope\"\nabove = 1")
                .contains("metric: unknown; one of replica_lag_bytes")
        );
        assert!(err("[[rule]]\nname = \"x\"\nmetric = \"pool_shed\"").contains("threshold"));
        assert!(
            err("[[rule]]\nname = \"x\"\nmetric = \"pool_shed\"\nabove = 1\nfor = \"soon\"")
                .contains("rule \"x\": for: not a duration")
        );
        assert!(
            err("[[rule]]\nname = \"x\"\nmetric = \"pool_shed\"\nabove = 1\nseverity = \"huge\"")
                .contains("info, warning or critical")
        );
        assert!(
            err("[[route]]\nseverity = \"critical\"\nchannels = [\"nowhere\"]")
                .contains("no channel named \"nowhere\"")
        );
        assert!(
            err("[[rule]]\nname = \"x\"\nmetrc = \"pool_shed\"").contains("unknown field `metrc`")
        );
        assert!(err("[channel.hook]\ntype = \"webhook\"\nurl = \"ftp://x\"").contains("url: "));
    }

    proptest! {
        #[test]
        fn no_string_from_the_file_appears_in_an_error(secret in "[A-Za-z0-9]{12,40}") {
            let files = [
                format!("[channel.hook]\ntype = \"webhook\"\nurl = \"ftp://h/{secret}\""),
                format!("[channel.hook]\ntype = \"webhook\"\nurl = \"https://u:{secret}@h/x\""),
                format!("[channel.hook]\ntype = \"webhook\"\nurl = \"https://h/{secret}\"\ntimeout = 5"),
                format!("[channel.hook]\ntype = \"webhook\"\nurl = \"https://h/{secret}\"\nattempts = \"{secret}\""),
                format!("[channel.hook]\ntype = \"webhook\"\nurl = \"https://h/{secret}\"\ntimeout = \"{secret}\""),
                format!("[channel.hook]\ntype = \"webhook\"\nurl = [\"{secret}\"]"),
                format!("[channel.hook]\ntype = \"pigeon\"\nurl = \"https://h/{secret}\""),
                format!("[channel.hook]\ntype = \"webhook\"\nurl = \"https://h/{secret}"),
                format!("[[rule]]\nname = \"{secret}!\"\nmetric = \"pool_shed\"\nabove = 1"),
                format!("[[rule]]\nname = \"x\"\nmetric = \"{secret}\"\nabove = 1"),
                format!("[[rule]]\nname = \"x\"\nmetric = \"pool_shed\"\nabove = \"{secret}\""),
            ];
            for f in &files {
                match AlertConfig::from_toml(f) {
                    Ok(c) => prop_assert!(!format!("{c:?}").contains(&secret), "{:?}", c),
                    Err(e) => {
                        let text = format!("{e} {e:?}");
                        prop_assert!(!text.contains(&secret), "{}", text);
                    }
                }
            }
        }
    }
}
