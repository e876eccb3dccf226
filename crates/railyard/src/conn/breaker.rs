//! A circuit breaker per target: connect attempts fail fast while a server is down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Error;

/// A circuit breaker per target: after `threshold` consecutive connect failures
/// of the reconnect kind (refused, timed out, starting up, too many
/// connections), calls fail fast for a jittered cooldown; then one probe
/// connection is let through. Its success closes the circuit; its failure
/// doubles the cooldown (up to `MAX_COOLDOWN`).
///
/// A multi-host target one of whose servers answered in the wrong role (a
/// standby, for `target_session_attrs=read-write`) is not down: its primary
/// role is moving, and such failures count for nothing (see `Opener::open`).
///
/// Only failed *probes* lengthen the cooldown. Connect attempts that were
/// already in flight when the server went down fail together, and count once:
/// they all say the same thing, and counting each would push the cooldown to its
/// maximum in one outage, keeping the circuit open long after the server is back.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    base: Duration,
    max: Duration,
    state: Mutex<BreakerState>,
}

/// What [`Breaker::admit`] let through: report its outcome with the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// An attempt while the circuit was closed.
    Closed,
    /// The one probe of an open circuit.
    Probe,
}

/// The longest cooldown: one probe connection per host this often is cheap,
/// and a server back from a long outage is noticed within this bound.
const MAX_COOLDOWN: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    probing: bool,
    last: String,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, base: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            base,
            max: MAX_COOLDOWN.max(base),
            state: Mutex::new(BreakerState::default()),
        }
    }

    fn open_error(&self, s: &BreakerState, host: &str, until: Instant) -> Error {
        Error::CircuitOpen {
            host: host.to_owned(),
            failures: s.failures,
            retry_in: until.saturating_duration_since(Instant::now()),
            last: s.last.clone(),
        }
    }

    /// Fails fast while the circuit is open (no probe is due).
    pub(crate) fn check(&self, host: &str) -> Result<(), Error> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.open_until {
            Some(until) if Instant::now() < until || s.probing => {
                Err(self.open_error(&s, host, until))
            }
            _ => Ok(()),
        }
    }

    /// Admits a connect attempt: always while closed, one probe once the
    /// cooldown is over.
    pub(crate) fn admit(&self, host: &str) -> Result<Admission, Error> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.open_until {
            None => Ok(Admission::Closed),
            Some(until) if Instant::now() < until || s.probing => {
                Err(self.open_error(&s, host, until))
            }
            Some(_) => {
                s.probing = true;
                Ok(Admission::Probe)
            }
        }
    }

    pub(crate) fn success(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.open_until.is_some() {
            tracing::info!(target: "railyard::pool", "circuit closed: the server answers again");
        }
        *s = BreakerState::default();
    }

    /// A connect attempt admitted as `admission` failed in a way that speaks of
    /// the server's health.
    pub(crate) fn failure(&self, admission: Admission, message: String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.last = message;
        match (admission, s.open_until.is_some()) {
            // Began before the circuit opened: the outage is already counted.
            (Admission::Closed, true) => {}
            (Admission::Closed, false) => {
                s.failures += 1;
                if s.failures >= self.threshold {
                    s.cooldown = self.base;
                    s.open_until = Some(Instant::now() + jittered(s.cooldown));
                    tracing::warn!(target: "railyard::pool", failures = s.failures, "circuit opened: connections fail fast until a probe succeeds");
                }
            }
            (Admission::Probe, _) => {
                s.failures += 1;
                s.probing = false;
                s.cooldown = (s.cooldown * 2).clamp(self.base, self.max);
                s.open_until = Some(Instant::now() + jittered(s.cooldown));
            }
        }
    }

    /// An attempt ended without saying anything of the server's health (a
    /// refused password, an unknown database): if it was the probe, let the
    /// next one through.
    pub(crate) fn inconclusive(&self, admission: Admission) {
        if admission == Admission::Probe {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).probing = false;
        }
    }

    /// The cooldown in force (zero while closed).
    #[cfg(test)]
    fn cooldown(&self) -> Duration {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.open_until.is_some() {
            s.cooldown
        } else {
            Duration::ZERO
        }
    }

    /// Whether the circuit is open now.
    pub(crate) fn is_open(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open_until
            .is_some()
    }
}

/// 50–100 % of `d`, so that many clients do not probe in step.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_in_flight_when_the_server_went_down_count_once() {
        let b = Breaker::new(3, Duration::from_millis(250));
        // 50 connects were in flight; all fail together.
        let tickets: Vec<_> = (0..50).map(|_| b.admit("h").unwrap()).collect();
        for t in tickets {
            b.failure(t, "refused".into());
        }
        assert!(b.is_open());
        assert_eq!(
            b.cooldown(),
            Duration::from_millis(250),
            "one outage, the base cooldown"
        );
        assert!(b.admit("h").is_err(), "fails fast while cooling down");
    }

    #[test]
    fn each_failed_probe_doubles_the_cooldown_up_to_the_bound_and_a_success_closes() {
        let b = Breaker::new(1, Duration::from_millis(1));
        let t = b.admit("h").unwrap();
        b.failure(t, "refused".into());
        let mut expected = Duration::from_millis(1);
        for _ in 0..20 {
            assert_eq!(b.cooldown(), expected);
            // Let the probe through as if the cooldown had passed.
            b.state.lock().unwrap().open_until = Some(Instant::now());
            let probe = b.admit("h").unwrap();
            assert_eq!(probe, Admission::Probe);
            assert!(b.admit("h").is_err(), "one probe at a time");
            b.failure(probe, "refused".into());
            expected = (expected * 2).min(MAX_COOLDOWN);
        }
        assert_eq!(b.cooldown(), MAX_COOLDOWN);
        b.state.lock().unwrap().open_until = Some(Instant::now());
        let probe = b.admit("h").unwrap();
        b.success();
        assert!(!b.is_open());
        assert_eq!(b.admit("h").unwrap(), Admission::Closed);
        let _ = probe;
    }

    #[test]
    fn an_inconclusive_probe_lets_the_next_one_through() {
        let b = Breaker::new(1, Duration::from_millis(1));
        let t = b.admit("h").unwrap();
        b.failure(t, "refused".into());
        b.state.lock().unwrap().open_until = Some(Instant::now());
        let probe = b.admit("h").unwrap();
        b.inconclusive(probe);
        assert_eq!(b.admit("h").unwrap(), Admission::Probe);
    }
}
