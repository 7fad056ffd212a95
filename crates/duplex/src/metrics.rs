//! The metrics duplex emits through the [`metrics`](https://docs.rs/metrics)
//! facade, and [`describe`], which gives each its description and unit and
//! registers it at zero, so that a scrape before the first connection lists
//! all of them.
//!
//! duplex installs no recorder: the application installs one (a Prometheus
//! exporter, say) and then calls [`describe`]:
//!
//! ```no_run
//! # fn install_recorder() {}
//! install_recorder(); // e.g. metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()
//! duplex::metrics::describe();
//! ```
//!
//! Called before a recorder is installed it does nothing (the facade drops
//! everything then); called again it changes no value. An application or
//! another crate describes its own metrics the same way, with its own list
//! of [`Metric`]s and [`describe_metrics`].

pub use metrics::Unit;

/// What kind of metric it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A count that only goes up (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
}

/// One metric: its name, kind, unit and description, and the label values
/// it is registered with at zero.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The name, as emitted.
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// The unit of its value.
    pub unit: Unit,
    /// What it counts or measures (Prometheus' `# HELP`).
    pub help: &'static str,
    /// A label and its values: one series per value is registered at
    /// zero; with no values (they are known at run time only) the metric
    /// is described and not registered. `None` for a metric without
    /// labels.
    pub label: Option<(&'static str, &'static [&'static str])>,
}

/// Every metric of the duplex crate.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "duplex_sessions",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "WebSocket sessions open now (upgraded, connection task running).",
        label: None,
    },
    Metric {
        name: "duplex_bytes_received_total",
        kind: Kind::Counter,
        unit: Unit::Bytes,
        help: "Bytes read from WebSocket connections (frames as on the wire).",
        label: None,
    },
    Metric {
        name: "duplex_messages_received_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Messages received from peers (whole messages, or frames on raw sessions).",
        label: None,
    },
    Metric {
        name: "duplex_bytes_sent_total",
        kind: Kind::Counter,
        unit: Unit::Bytes,
        help: "Bytes written to WebSocket connections (frames as on the wire).",
        label: None,
    },
    Metric {
        name: "duplex_extension_encoded_messages_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Messages an extension transformed (permessage-deflate: compressed when sent, inflated when received), by direction.",
        label: Some(("direction", &["sent", "received"])),
    },
    Metric {
        name: "duplex_memory_budget_used_bytes",
        kind: Kind::Gauge,
        unit: Unit::Bytes,
        help: "Bytes the WebSocket sessions hold against the memory budget (queues, messages being received, read buffers), updated in 64 KiB steps (with several separate budgets in one process, the one that moved last).",
        label: None,
    },
    Metric {
        name: "duplex_memory_budget_closes_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Sessions closed with 1013 because the memory budget kept them from reading for 15 s while they held bytes.",
        label: None,
    },
    Metric {
        name: "duplex_write_timeouts_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Connections dropped because the peer took no byte of queued output (a session's, or an HTTP response) for write_timeout.",
        label: None,
    },
    Metric {
        name: "duplex_connections_refused_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Connections closed at accept: past max_connections or max_connections_per_ip, or past the TLS handshakes in progress (server-wide or from one address).",
        label: None,
    },
    Metric {
        name: "duplex_http2_responses_refused_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "HTTP/2 requests answered 503 (or reset, for a body of unknown length) because their connection held 256 KiB of responses its peer had not taken.",
        label: None,
    },
    Metric {
        name: "duplex_upgrades_refused_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "WebSocket upgrades refused, by reason: the handshake's checks (400, 403, 405, 426, 501), shutting down, the session limits and the memory budget (503, 429).",
        label: Some(("reason", &crate::handshake::Rejection::LABELS)),
    },
    Metric {
        name: "duplex_hub_sessions",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Sessions registered in hubs of this process.",
        label: None,
    },
    Metric {
        name: "duplex_hub_topics",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Topics with at least one member in hubs of this process.",
        label: None,
    },
    Metric {
        name: "duplex_hub_published_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Messages fanned out by hubs of this process (each publish or broadcast, as delivered here).",
        label: None,
    },
    Metric {
        name: "duplex_hub_deliveries_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Messages a hub queued for one subscriber.",
        label: None,
    },
    Metric {
        name: "duplex_hub_bytes_out_total",
        kind: Kind::Counter,
        unit: Unit::Bytes,
        help: "Bytes hubs queued for subscribers (frames as written, compressed where the session compresses).",
        label: None,
    },
    Metric {
        name: "duplex_hub_dropped_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Hub messages skipped for a subscriber whose outgoing buffer was full (SlowConsumer::Drop) or busy.",
        label: None,
    },
    Metric {
        name: "duplex_hub_slow_consumer_closes_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Subscribers closed by a hub because their outgoing buffer was full (SlowConsumer::Close).",
        label: None,
    },
];

/// Describes every metric of the duplex crate ([`METRICS`]) to the
/// installed recorder and registers each at zero; see the
/// [module](self).
pub fn describe() {
    describe_metrics(METRICS);
}

/// Describes `metrics` to the installed recorder and registers each series
/// (each label value) without changing its value: a new one reads zero, one
/// already counting keeps its count.
pub fn describe_metrics(metrics: &[Metric]) {
    for metric in metrics {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.unit, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.unit, metric.help),
        }
        let series: Vec<Vec<metrics::Label>> = match metric.label {
            None => vec![Vec::new()],
            Some((key, values)) => values
                .iter()
                .map(|value| vec![metrics::Label::new(key, *value)])
                .collect(),
        };
        for labels in series {
            // Adding zero registers the series and leaves a running count
            // as it is, so that a second call resets nothing.
            match metric.kind {
                Kind::Counter => metrics::counter!(metric.name, labels).increment(0),
                Kind::Gauge => metrics::gauge!(metric.name, labels).increment(0.0),
            }
        }
    }
}
