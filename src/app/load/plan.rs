//! The day's plan: a seeded, reproducible sequence of operations with their
//! intended start times (a Poisson arrival process at the configured rate, 20×
//! during a burst). Both the Railyard run and the raw baseline replay the same
//! plan, so they are asked for exactly the same work.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Place a limit order (idempotency key; session write), then run the
    /// matcher on its symbol.
    Place,
    /// The matcher's SERIALIZABLE transaction that follows a placement.
    Match,
    /// The trader's balance, open orders and positions (session read).
    Portfolio,
    /// The top of a symbol's order book (session read).
    Book,
    /// A deposit (idempotency key; session write).
    Deposit,
    /// Cancel the trader's oldest open order.
    Cancel,
}

impl OpKind {
    /// Every kind, in report order.
    pub const ALL: [OpKind; 6] = [
        OpKind::Place,
        OpKind::Match,
        OpKind::Portfolio,
        OpKind::Book,
        OpKind::Deposit,
        OpKind::Cancel,
    ];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Place => "place",
            OpKind::Match => "match",
            OpKind::Portfolio => "portfolio",
            OpKind::Book => "book",
            OpKind::Deposit => "deposit",
            OpKind::Cancel => "cancel",
        }
    }
}

/// Buy or sell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Buy.
    Buy,
    /// Sell.
    Sell,
}

impl Side {
    /// As stored in `orders.side`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        }
    }
}

/// One planned operation.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its position in the plan (0-based).
    pub seq: u64,
    /// When it should start, from the start of the run.
    pub at: Duration,
    /// The trader (index into the traders).
    pub trader: usize,
    /// What it does.
    pub action: Action,
}

/// The operation and its arguments.
#[derive(Debug, Clone)]
pub enum Action {
    /// Place an order, then match its symbol.
    Place {
        /// Index into the symbols.
        symbol: usize,
        /// Buy or sell.
        side: Side,
        /// Shares.
        quantity: i64,
        /// Offset from the symbol's reference price, in basis points.
        price_offset_bp: i64,
        /// The rebate the matcher will try to grant the buyer, as a
        /// percentage of the buyer's fee (over 100 is refused by a CHECK).
        rebate_pct: i64,
    },
    /// Read the trader's portfolio.
    Portfolio,
    /// Read a symbol's book.
    Book {
        /// Index into the symbols.
        symbol: usize,
    },
    /// Deposit cents.
    Deposit {
        /// Cents.
        amount_cents: i64,
    },
    /// Cancel the trader's oldest open order.
    Cancel,
}

impl Action {
    /// The kind recorded for this action (a placement's match is recorded
    /// separately as [`OpKind::Match`]).
    pub fn kind(&self) -> OpKind {
        match self {
            Action::Place { .. } => OpKind::Place,
            Action::Portfolio => OpKind::Portfolio,
            Action::Book { .. } => OpKind::Book,
            Action::Deposit { .. } => OpKind::Deposit,
            Action::Cancel => OpKind::Cancel,
        }
    }
}

/// A Zipf distribution over ranks `0..n`: rank k is chosen with probability
/// proportional to 1/(k+1)^s. The few hot symbols take most of the orders,
/// which is what makes the matcher contend.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// Over `n` ranks (at least 1) with exponent `s`.
    pub fn new(n: usize, s: f64) -> Self {
        let weights: Vec<f64> = (1..=n.max(1)).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Zipf { cdf }
    }

    /// A rank.
    pub fn sample(&self, rng: &mut impl RngExt) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }

    /// The probability of rank `k`.
    #[cfg(test)]
    pub fn probability(&self, k: usize) -> f64 {
        let prev = if k == 0 { 0.0 } else { self.cdf[k - 1] };
        self.cdf[k] - prev
    }
}

/// The rate profile: a base rate and an optional burst window.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Operations per second.
    pub per_second: f64,
    /// A window in which the rate is 20×.
    pub burst: Option<(Duration, Duration)>,
}

/// How many times the base rate a burst runs at.
pub const BURST_FACTOR: f64 = 20.0;

impl Rate {
    fn at(&self, t: Duration) -> f64 {
        match self.burst {
            Some((from, to)) if t >= from && t < to => self.per_second * BURST_FACTOR,
            _ => self.per_second,
        }
    }
}

/// The plan's generator: an endless, reproducible sequence of operations.
#[derive(Debug)]
pub struct Plan {
    rng: StdRng,
    rate: Rate,
    traders: usize,
    symbols: Zipf,
    next_at: f64,
    seq: u64,
}

impl Plan {
    /// A plan for `traders` traders over `symbols` symbols.
    pub fn new(seed: u64, rate: Rate, traders: usize, symbols: usize) -> Self {
        Plan {
            rng: StdRng::seed_from_u64(seed),
            rate,
            traders: traders.max(1),
            symbols: Zipf::new(symbols, 1.1),
            next_at: 0.0,
            seq: 0,
        }
    }
}

impl Iterator for Plan {
    type Item = Planned;

    fn next(&mut self) -> Option<Planned> {
        let at = Duration::from_secs_f64(self.next_at);
        // Exponential inter-arrival times: a Poisson process at the rate in force.
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        self.next_at += -u.ln() / self.rate.at(at);
        let trader = self.rng.random_range(0..self.traders);
        let roll = self.rng.random_range(0..100u32);
        let action = match roll {
            0..45 => Action::Place {
                symbol: self.symbols.sample(&mut self.rng),
                side: if self.rng.random_bool(0.5) {
                    Side::Buy
                } else {
                    Side::Sell
                },
                quantity: self.rng.random_range(1..=50),
                price_offset_bp: self.rng.random_range(-150..=150),
                rebate_pct: if self.rng.random_bool(0.2) {
                    self.rng.random_range(10..=150)
                } else {
                    0
                },
            },
            45..70 => Action::Portfolio,
            70..90 => Action::Book {
                symbol: self.symbols.sample(&mut self.rng),
            },
            90..95 => Action::Deposit {
                amount_cents: self.rng.random_range(1_000..=100_000),
            },
            _ => Action::Cancel,
        };
        let seq = self.seq;
        self.seq += 1;
        Some(Planned {
            seq,
            at,
            trader,
            action,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let rate = Rate {
            per_second: 100.0,
            burst: None,
        };
        let a: Vec<_> = Plan::new(7, rate, 10, 20)
            .take(500)
            .map(|p| format!("{p:?}"))
            .collect();
        let b: Vec<_> = Plan::new(7, rate, 10, 20)
            .take(500)
            .map(|p| format!("{p:?}"))
            .collect();
        let c: Vec<_> = Plan::new(8, rate, 10, 20)
            .take(500)
            .map(|p| format!("{p:?}"))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn arrivals_follow_the_rate_and_burst_twenty_times_faster() {
        let rate = Rate {
            per_second: 200.0,
            burst: Some((Duration::from_secs(10), Duration::from_secs(20))),
        };
        let plan: Vec<_> = Plan::new(1, rate, 10, 20)
            .take_while(|p| p.at < Duration::from_secs(30))
            .collect();
        let in_window = |from: u64, to: u64| {
            plan.iter()
                .filter(|p| p.at >= Duration::from_secs(from) && p.at < Duration::from_secs(to))
                .count() as f64
        };
        let before = in_window(0, 10) / 10.0;
        let during = in_window(10, 20) / 10.0;
        assert!(
            (before - 200.0).abs() < 20.0,
            "{before} ops/s before the burst"
        );
        assert!(
            (during - 4000.0).abs() < 200.0,
            "{during} ops/s during the burst"
        );
    }

    #[test]
    fn zipf_makes_the_first_symbols_hot() {
        let z = Zipf::new(50, 1.1);
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [0u32; 50];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        let share = |k: usize| f64::from(counts[k]) / 100_000.0;
        assert!((share(0) - z.probability(0)).abs() < 0.01);
        assert!(
            share(0) > 10.0 * share(20),
            "rank 0 is far hotter than rank 20"
        );
        assert!(counts.iter().all(|&c| c > 0));
    }
}
