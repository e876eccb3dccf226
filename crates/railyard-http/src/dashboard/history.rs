//! The history the page draws: the samples as one array per series, values
//! rounded.

use std::collections::BTreeMap;
use std::sync::Arc;

use railyard::observe::HealthStatus;
use railyard_ops::watch::Sample;
use serde::Serialize;

use super::{LAG_SERIES, round};

/// Samples as one array per series, values rounded.
#[derive(Debug, Default, PartialEq, Serialize)]
pub(crate) struct History {
    pub(crate) at_ms: Vec<u64>,
    /// 0 healthy, 1 degraded, 2 unhealthy.
    pub(crate) status: Vec<u8>,
    pub(crate) qps: Vec<f64>,
    pub(crate) p50: Vec<Option<f64>>,
    pub(crate) p95: Vec<Option<f64>>,
    pub(crate) p99: Vec<Option<f64>>,
    /// Errors per second by class; a class seen in any of the samples has a
    /// value (0 when absent) for each.
    pub(crate) errors: BTreeMap<&'static str, Vec<f64>>,
    /// Retries per second by class, likewise.
    pub(crate) retries: BTreeMap<&'static str, Vec<f64>>,
    /// Each replica's lag in seconds (`null` where it was not listed).
    pub(crate) lag_s: BTreeMap<String, Vec<Option<f64>>>,
}

impl History {
    pub(crate) fn of(samples: &[Arc<Sample>]) -> History {
        let n = samples.len();
        let mut h = History {
            at_ms: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            qps: Vec::with_capacity(n),
            p50: Vec::with_capacity(n),
            p95: Vec::with_capacity(n),
            p99: Vec::with_capacity(n),
            ..History::default()
        };
        for (i, s) in samples.iter().enumerate() {
            h.at_ms.push(s.at_ms);
            h.status.push(match s.status {
                HealthStatus::Healthy => 0,
                HealthStatus::Degraded => 1,
                _ => 2,
            });
            h.qps.push(round(s.queries_per_s, 1));
            h.p50.push(s.p50_ms.map(|v| round(v, 3)));
            h.p95.push(s.p95_ms.map(|v| round(v, 3)));
            h.p99.push(s.p99_ms.map(|v| round(v, 3)));
            for (class, v) in &s.errors_per_s {
                h.errors.entry(class).or_insert_with(|| vec![0.0; n])[i] = round(*v, 2);
            }
            for (class, v) in &s.retries_per_s {
                h.retries.entry(class).or_insert_with(|| vec![0.0; n])[i] = round(*v, 2);
            }
            for r in &s.replicas {
                if h.lag_s.len() >= LAG_SERIES && !h.lag_s.contains_key(&r.name) {
                    continue;
                }
                h.lag_s
                    .entry(r.name.clone())
                    .or_insert_with(|| vec![None; n])[i] = Some(round(r.lag_seconds, 3));
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::fixtures::{replica, sample};

    #[test]
    fn history_is_one_array_per_series_rounded_with_gaps_filled() {
        let samples: Vec<_> = (0..6).map(|i| sample(1_000 + i as u64 * 1000, i)).collect();
        let h = History::of(&samples);
        assert_eq!(h.at_ms, vec![1000, 2000, 3000, 4000, 5000, 6000]);
        assert_eq!(h.status, vec![0, 0, 0, 0, 1, 0]);
        assert_eq!(h.qps, vec![123.5; 6]);
        assert_eq!(h.p50[1], Some(1.235));
        assert_eq!(h.p50[2], None);
        assert_eq!(h.p99[0], Some(9.877));
        assert_eq!(h.errors["timeout"], vec![0.33, 0.0, 0.0, 0.33, 0.0, 0.0]);
        assert_eq!(
            h.retries["retry_transaction"],
            vec![0.0, 0.0, 0.0, 0.0, 0.0, 2.12]
        );
        // replica-1 appears only in odd samples; null elsewhere.
        assert_eq!(h.lag_s["replica-0"], vec![Some(0.123); 6]);
        assert_eq!(
            h.lag_s["replica-1"],
            vec![None, Some(0.123), None, Some(0.123), None, Some(0.123)]
        );
        // Compact: far smaller than the samples themselves.
        let compact = serde_json::to_string(&h).unwrap();
        let full =
            serde_json::to_string(&samples.iter().map(|s| &**s).collect::<Vec<_>>()).unwrap();
        eprintln!(
            "6 samples: {} bytes compact, {} as objects",
            compact.len(),
            full.len()
        );
        assert!(
            compact.len() * 3 < full.len(),
            "{compact} vs {}",
            full.len()
        );
        let empty = serde_json::to_string(&History::of(&[])).unwrap();
        assert_eq!(
            empty,
            r#"{"at_ms":[],"status":[],"qps":[],"p50":[],"p95":[],"p99":[],"errors":{},"retries":{},"lag_s":{}}"#
        );
    }

    #[test]
    fn one_new_sample_is_a_few_hundred_bytes() {
        let h = History::of(&[sample(1_700_000_000_000, 3)]);
        let n = serde_json::to_string(&h).unwrap().len();
        assert!(n < 300, "{n}");
    }

    #[test]
    fn lag_series_are_bounded() {
        let mut s = (*sample(1, 0)).clone();
        s.replicas = (0..100)
            .map(|r| replica(format!("r{r}"), "down", 0, 0.0, true, 1))
            .collect();
        let h = History::of(&[Arc::new(s)]);
        assert_eq!(h.lag_s.len(), LAG_SERIES);
    }
}
