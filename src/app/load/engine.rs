//! The workload through Railyard: each planned operation becomes calls of
//! the ledger (`app::ledger`), timed step by step, with the retries of each
//! attempt attributed to it by a query hook.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use railyard::{Database, ErrorClass, Route};
use tokio::time::Instant;

use super::plan::{Action, OpKind, Planned};
use super::record::{Outcome, Step};
use crate::app::ledger::{self, Symbol, Trader};

/// Runs planned operations; the Railyard run and the raw baseline each have one.
pub trait Engine: Send + Sync + 'static {
    /// Runs one operation and reports its steps.
    // Long by design: the load loop: workers, faults and the clock, in one place.
    fn run(self: Arc<Self>, op: Planned) -> impl Future<Output = Vec<Step>> + Send + 'static;
}

/// The most retries one operation's trace keeps.
const TRACE_BOUND: usize = 64;

tokio::task_local! {
    static TRACE: RefCell<Vec<&'static str>>;
}

/// A `tracing` layer that attributes each of Railyard's "retrying" events
/// (target `railyard::retry`, with the failure's `class`) to the operation
/// whose task emitted it: the retry loop runs inside the caller's future, so
/// a task-local trace sees exactly that operation's retries.
#[derive(Debug, Default)]
pub struct RetryLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RetryLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "railyard::retry" {
            return;
        }
        #[derive(Default)]
        struct Fields {
            retrying: bool,
            class: Option<&'static str>,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                let text = format!("{value:?}");
                match field.name() {
                    "message" => self.retrying = text == "retrying",
                    "class" => {
                        self.class = ErrorClass::ALL
                            .iter()
                            .map(|c| c.as_str())
                            .find(|c| *c == text)
                    }
                    _ => {}
                }
            }
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if f.retrying {
            let _ = TRACE.try_with(|t| {
                let mut t = t.borrow_mut();
                if t.len() < TRACE_BOUND {
                    t.push(f.class.unwrap_or("unknown"));
                }
            });
        }
    }
}

/// Runs `f` and returns its value with the class of each retried attempt.
async fn traced<T>(f: impl Future<Output = T>) -> (T, Vec<&'static str>) {
    TRACE
        .scope(RefCell::new(Vec::new()), async {
            let v = f.await;
            (v, TRACE.with(|t| t.take()))
        })
        .await
}

/// The ledger through Railyard.
#[derive(Debug)]
pub struct RailyardEngine {
    traders: Vec<Trader>,
    symbols: Vec<Symbol>,
    run: String,
}

impl RailyardEngine {
    /// An engine for these accounts and symbols; `run` prefixes idempotency keys.
    pub fn new(db: &Database, accounts: &[i64], symbols: Vec<Symbol>, run: String) -> Self {
        RailyardEngine {
            traders: accounts
                .iter()
                .map(|&account_id| Trader {
                    account_id,
                    session: db.session(),
                    last_order: AtomicI64::new(0),
                })
                .collect(),
            symbols,
            run,
        }
    }
}

fn step(kind: OpKind, started: Instant, outcome: Outcome) -> Step {
    Step {
        kind,
        started,
        ended: Instant::now(),
        outcome,
    }
}

fn failed(e: &railyard::Error, retries: Vec<&'static str>) -> Outcome {
    Outcome {
        error: Some(e.class().as_str()),
        retries,
        ..Outcome::default()
    }
}

impl Engine for RailyardEngine {
    async fn run(self: Arc<Self>, op: Planned) -> Vec<Step> {
        let trader = &self.traders[op.trader % self.traders.len()];
        let key = format!("{}-{}", self.run, op.seq);
        let started = Instant::now();
        let kind = op.action.kind();
        match op.action {
            Action::Place {
                symbol,
                side,
                quantity,
                price_offset_bp,
                rebate_pct,
            } => {
                let sym = &self.symbols[symbol % self.symbols.len()];
                let price = sym.limit_price(price_offset_bp);
                let (placed, retries) = traced(ledger::place(
                    trader,
                    &key,
                    &sym.symbol,
                    side.as_str(),
                    quantity,
                    price,
                ))
                .await;
                let mut steps = Vec::with_capacity(2);
                match placed {
                    Err(e) => steps.push(step(kind, started, failed(&e, retries))),
                    Ok(_) => {
                        steps.push(step(
                            kind,
                            started,
                            Outcome {
                                retries,
                                ..Outcome::default()
                            },
                        ));
                        let started = Instant::now();
                        let (matched, retries) =
                            traced(ledger::match_once(&trader.session, &sym.symbol, rebate_pct))
                                .await;
                        let outcome = match matched {
                            Ok(_) => Outcome {
                                retries,
                                ..Outcome::default()
                            },
                            Err(e) => failed(&e, retries),
                        };
                        steps.push(step(OpKind::Match, started, outcome));
                    }
                }
                steps
            }
            Action::Portfolio => {
                let (read, retries) = traced(ledger::portfolio(trader)).await;
                let outcome = match read {
                    Ok((_, route, stale)) => Outcome {
                        retries,
                        replica: Some(matches!(route, Route::Replica(_))),
                        stale,
                        ..Outcome::default()
                    },
                    Err(e) => failed(&e, retries),
                };
                vec![step(kind, started, outcome)]
            }
            Action::Book { symbol } => {
                let sym = &self.symbols[symbol % self.symbols.len()];
                let (read, retries) = traced(ledger::book(&trader.session, &sym.symbol)).await;
                let outcome = match read {
                    Ok((_, route)) => Outcome {
                        retries,
                        replica: Some(matches!(route, Route::Replica(_))),
                        ..Outcome::default()
                    },
                    Err(e) => failed(&e, retries),
                };
                vec![step(kind, started, outcome)]
            }
            Action::Deposit { amount_cents } => {
                let (r, retries) = traced(ledger::deposit(trader, &key, amount_cents)).await;
                let outcome = match r {
                    Ok(_) => Outcome {
                        retries,
                        ..Outcome::default()
                    },
                    Err(e) => failed(&e, retries),
                };
                vec![step(kind, started, outcome)]
            }
            Action::Cancel => {
                let (r, retries) = traced(ledger::cancel_oldest(trader)).await;
                let outcome = match r {
                    Ok(_) => Outcome {
                        retries,
                        ..Outcome::default()
                    },
                    Err(e) => failed(&e, retries),
                };
                vec![step(kind, started, outcome)]
            }
        }
    }
}
