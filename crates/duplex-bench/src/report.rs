//! The load generator's result line and the runner's statistics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one load run measured: named numbers, printed by `load` as one JSON
/// line on stdout.
///
/// Echo: `msgs_per_s`, `mb_per_s` (payload bytes returned, one direction),
/// `p50_us`, `p99_us`, `p999_us`. Connections: `handshakes_per_s`,
/// `rss_before_kib`, `rss_after_kib`, `kib_per_conn`. Broadcast:
/// `deliveries_per_s`, `publishes_per_s`, `p50_us`, `p99_us`, `p999_us`,
/// `dropped` (messages a subscriber never got). With `--deflate`, also
/// `deflate` (the share of connections that agreed to permessage-deflate);
/// connections: `compressed_echoes`, `client_wire_ratio`, `exchange_s`;
/// broadcast: `compressed_share`, `wire_bytes_per_delivery`, `inflated`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// `echo`, `connections` or `broadcast`.
    pub mode: String,
    /// The numbers.
    pub metrics: BTreeMap<String, f64>,
}

impl Outcome {
    /// An empty outcome of `mode`.
    pub fn new(mode: &str) -> Self {
        Outcome {
            mode: mode.to_owned(),
            metrics: BTreeMap::new(),
        }
    }

    /// Sets a number.
    pub fn set(&mut self, name: &str, value: f64) -> &mut Self {
        self.metrics.insert(name.to_owned(), value);
        self
    }

    /// A number, if measured.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).copied()
    }
}

/// The median of `values` (the mean of the middle two for an even count);
/// `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
