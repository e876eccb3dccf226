//! A circuit breaker per target: connect attempts fail fast while a server is down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Error;

/// A circuit breaker per target: after `threshold` consecutive connect failures
/// of the reconnect kind (refused, timed out, starting up, too many
/// connections), calls fail fast for a jittered cooldown that doubles while the
/// server stays down; then one probe connection is let through, and its success
/// closes the circuit.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    base: Duration,
    max: Duration,
    state: Mutex<BreakerState>,
}

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
            max: Duration::from_secs(30),
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
    pub(crate) fn admit(&self, host: &str) -> Result<(), Error> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.open_until {
            None => Ok(()),
            Some(until) if Instant::now() < until || s.probing => {
                Err(self.open_error(&s, host, until))
            }
            Some(_) => {
                s.probing = true;
                Ok(())
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

    pub(crate) fn failure(&self, message: String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failures += 1;
        s.last = message;
        let was_open = s.open_until.is_some();
        s.probing = false;
        if s.failures >= self.threshold {
            s.cooldown = if was_open {
                (s.cooldown * 2).min(self.max)
            } else {
                self.base
            };
            // Jitter (50–100 %) so that many clients do not probe in step.
            let jitter = rand::random_range(0.5..=1.0);
            s.open_until = Some(Instant::now() + s.cooldown.mul_f64(jitter));
            if !was_open {
                tracing::warn!(target: "railyard::pool", failures = s.failures, "circuit opened: connections fail fast until a probe succeeds");
            }
        }
    }

    /// A probe ended without saying anything of the server's health (a refused
    /// password, an unknown database): let the next one through.
    pub(crate) fn probe_ended(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).probing = false;
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
