//! A fixed-size latency histogram: exact below 256 µs, then 128 linear steps
//! per power of two (a recorded value is within 0.8 % of the true one), from
//! 1 µs to 2³² µs (71 minutes). 3,328 saturating `u32` counters, 13 KB.
//!
//! The layout is HdrHistogram's with two significant digits, so quantiles
//! read the same (a property test compares them); ours because the crate
//! brought three dependencies into every application for one array.

/// Values below this are counted one by one.
const EXACT: u64 = 256;
/// Linear steps per power of two above [`EXACT`].
const STEPS: u64 = 128;
/// The largest value counted (larger ones count as it).
pub(crate) const MAX_VALUE: u64 = u32::MAX as u64;
/// Counters: the exact range, then 24 powers of two (2⁸ to 2³¹).
pub(crate) const BUCKETS: usize = (EXACT + 24 * STEPS) as usize;

/// Latency counts by bucket.
#[derive(Clone)]
pub(crate) struct Histogram {
    counts: Box<[u32; BUCKETS]>,
    total: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

fn index(value: u64) -> usize {
    let v = value.min(MAX_VALUE);
    if v < EXACT {
        return v as usize;
    }
    let exp = 63 - u64::from(v.leading_zeros()); // 8..=31
    let step = v >> (exp - 7); // 128..=255
    (EXACT + (exp - 8) * STEPS + (step - STEPS)) as usize
}

/// The largest value that lands in bucket `i`.
fn highest(i: usize) -> u64 {
    let i = i as u64;
    if i < EXACT {
        return i;
    }
    let exp = (i - EXACT) / STEPS + 8;
    let step = (i - EXACT) % STEPS + STEPS;
    ((step + 1) << (exp - 7)) - 1
}

impl Histogram {
    /// Counts `value` (values past [`MAX_VALUE`] count as it; none is lost).
    pub(crate) fn record(&mut self, value: u64) {
        let c = &mut self.counts[index(value)];
        *c = c.saturating_add(1);
        self.total += 1;
    }

    /// Adds another histogram's counts.
    pub(crate) fn add(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
    }

    /// Forgets every count.
    pub(crate) fn reset(&mut self) {
        self.counts.fill(0);
        self.total = 0;
    }

    /// The value at quantile `q` (0 to 1): the highest value of the bucket
    /// where the count reaches `q` of the total; 0 when empty.
    pub(crate) fn value_at_quantile(&self, q: f64) -> u64 {
        let wanted = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= wanted {
                return highest(i);
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_cover_the_range_without_gaps() {
        assert_eq!(BUCKETS, 3_328);
        assert_eq!(index(0), 0);
        assert_eq!(index(255), 255);
        assert_eq!(index(MAX_VALUE), BUCKETS - 1);
        assert_eq!(highest(BUCKETS - 1), MAX_VALUE);
        for i in 1..BUCKETS {
            assert_eq!(
                index(highest(i - 1) + 1),
                i,
                "bucket {i} starts after {}",
                i - 1
            );
            assert_eq!(index(highest(i)), i);
        }
    }

    proptest! {
        #[test]
        fn quantiles_read_as_hdr_histogram_reads_them(
            values in proptest::collection::vec(1u64..4_000_000_000, 1..400),
            q in 0.0f64..=1.0,
        ) {
            let mut ours = Histogram::default();
            let mut hdr = hdrhistogram::Histogram::<u32>::new_with_bounds(1, MAX_VALUE, 2).unwrap();
            for v in &values {
                ours.record(*v);
                hdr.saturating_record(*v);
            }
            for q in [q, 0.5, 0.95, 0.99, 1.0] {
                prop_assert_eq!(ours.value_at_quantile(q), hdr.value_at_quantile(q), "q {}", q);
            }
        }

        #[test]
        fn a_value_is_read_back_within_one_percent(v in 1u64..MAX_VALUE) {
            let mut h = Histogram::default();
            h.record(v);
            let back = h.value_at_quantile(0.5);
            prop_assert!(back >= v && (back - v) as f64 <= v as f64 * 0.008, "{} read as {}", v, back);
        }
    }
}
