//! A pool's check-out queue, bounded: how many check-outs may wait at once,
//! and the record of those shed.
//!
//! bb8 queues every check-out it cannot serve until the checkout timeout, with
//! no bound on how many. In front of it, each of our pools keeps a count of
//! the check-outs in progress (waiting for a connection, or about to receive
//! one): a check-out that would take it past the bound is refused at once, and
//! one that waited its whole wait budget while every connection was in use
//! gives up (the pool decides that; see `TargetPool::get_owned`). A place in
//! the queue is a guard: a check-out that ends in any way, its future dropped
//! included, gives its place back.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::error::Shed;

/// The bound on the check-outs in progress of one pool, and its counters.
#[derive(Debug)]
pub(crate) struct Queue {
    max: u32,
    waiting: AtomicU32,
    peak: AtomicU32,
}

/// A place in the queue, given back when dropped.
#[derive(Debug)]
pub(crate) struct Place<'a>(&'a Queue);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Queue {
    pub(crate) fn new(max: u32) -> Self {
        Queue {
            max,
            waiting: AtomicU32::new(0),
            peak: AtomicU32::new(0),
        }
    }

    /// A place, unless `max` check-outs are in progress already.
    pub(crate) fn enter(&self) -> Option<Place<'_>> {
        let before = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        self.peak.fetch_max(before + 1, Ordering::AcqRel);
        Some(Place(self))
    }

    /// The bound.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Check-outs in progress now.
    pub(crate) fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }

    /// The most check-outs in progress at once so far.
    pub(crate) fn peak(&self) -> u32 {
        self.peak.load(Ordering::Acquire)
    }
}

/// Seconds of shedding remembered for the health report.
const WINDOW: usize = 60;

/// Check-outs shed by one pool: in all, and per second over the last minute
/// (60 counters: bounded, lock-free).
#[derive(Debug)]
pub(crate) struct ShedLog {
    total: AtomicU64,
    started: Instant,
    /// `(second since started, count)` per second, indexed by second modulo 60
    /// (boxed: a pool is kept inline in its owner).
    seconds: Box<[(AtomicU64, AtomicU64); WINDOW]>,
}

impl Default for ShedLog {
    fn default() -> Self {
        ShedLog {
            total: AtomicU64::new(0),
            started: Instant::now(),
            seconds: Box::new(std::array::from_fn(|_| {
                (AtomicU64::new(u64::MAX), AtomicU64::new(0))
            })),
        }
    }
}

impl ShedLog {
    /// Counts one shed check-out. The first of each second is logged (a
    /// warning per shed check-out would flood the logs of an overloaded
    /// service).
    pub(crate) fn record(&self, pool: &str, why: Shed) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_secs();
        let (at, count) = &self.seconds[(now % WINDOW as u64) as usize];
        let seen = at.load(Ordering::Acquire);
        // Racing takeovers of a stale slot may lose a count or two of that
        // second: the report says "shedding", not an exact figure per second.
        if seen != now
            && at
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            count.store(0, Ordering::Relaxed);
            tracing::warn!(target: "railyard::pool", pool, why = %why, "shedding check-outs: the pool is overloaded (logged once a second; see railyard_pool_checkouts_shed_total)");
        }
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// Check-outs shed since the pool was built.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Check-outs shed over the last minute.
    pub(crate) fn last_minute(&self) -> u64 {
        let now = self.started.elapsed().as_secs();
        self.seconds
            .iter()
            .filter(|(at, _)| {
                let at = at.load(Ordering::Acquire);
                at <= now && now - at < WINDOW as u64
            })
            .map(|(_, n)| n.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_never_holds_more_than_its_bound_and_places_come_back() {
        let q = Queue::new(3);
        let places: Vec<_> = (0..3).map(|_| q.enter().expect("room")).collect();
        assert!(q.enter().is_none(), "full");
        assert_eq!(q.waiting(), 3);
        drop(places);
        assert_eq!(q.waiting(), 0);
        assert!(q.enter().is_some());
        assert_eq!(q.peak(), 3);
    }

    #[test]
    fn places_are_bounded_under_contention() {
        let q = std::sync::Arc::new(Queue::new(5));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let place = q.enter();
                        assert!(q.waiting() <= 5);
                        drop(place);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(q.waiting(), 0);
        assert!(q.peak() <= 5, "{}", q.peak());
    }

    #[test]
    fn the_shed_log_counts_the_last_minute() {
        let log = ShedLog::default();
        for _ in 0..4 {
            log.record("primary", Shed::QueueFull { max_waiters: 1 });
        }
        assert_eq!(log.total(), 4);
        assert_eq!(log.last_minute(), 4);
    }
}
