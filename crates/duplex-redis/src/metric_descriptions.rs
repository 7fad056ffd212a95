//! The metrics the Redis backplane emits, described for
//! [`duplex::metrics::describe_metrics`].

use duplex::metrics::{Kind, Metric, Unit};

/// Every metric of duplex-redis.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "duplex_redis_connected",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "1 while both connections of the backplane on this channel are up, else 0.",
        // The channel is the application's: the series appears when its
        // backplane connects.
        label: Some(("channel", &[])),
    },
    Metric {
        name: "duplex_redis_dropped_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Envelopes not published to Redis: queue full, stale after a reconnect, or a failed pipeline.",
        label: None,
    },
    Metric {
        name: "duplex_redis_stalls_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Redis connections dropped because Redis did not answer within the response timeout.",
        label: Some(("connection", &["publishing", "subscription"])),
    },
];

/// Describes [`METRICS`] to the installed recorder and registers them at
/// zero, as [`duplex::metrics::describe`] does for duplex's: call both after
/// installing a recorder.
pub fn describe_metrics() {
    duplex::metrics::describe_metrics(METRICS);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name in a `metrics::` macro of this crate is listed, with its
    /// kind, and nothing listed is gone.
    #[test]
    fn every_emitted_metric_is_listed() {
        let source = include_str!("lib.rs");
        let mut emitted = std::collections::BTreeSet::new();
        for (macro_name, kind) in [("counter", Kind::Counter), ("gauge", Kind::Gauge)] {
            let needle = format!("metrics::{macro_name}!(\"");
            for (at, _) in source.match_indices(&needle) {
                let rest = &source[at + needle.len()..];
                let name = &rest[..rest.find('"').unwrap()];
                let metric = METRICS
                    .iter()
                    .find(|m| m.name == name)
                    .unwrap_or_else(|| panic!("{name} is emitted but not listed"));
                assert_eq!(metric.kind, kind, "{name}");
                emitted.insert(name);
            }
        }
        assert_eq!(emitted.len(), METRICS.len(), "listed: {METRICS:?}");
    }
}
