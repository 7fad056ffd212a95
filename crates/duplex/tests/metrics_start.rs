//! `duplex::metrics::describe`: every metric the crate emits is in its
//! list with the right kind and label, and describing registers each series
//! at zero (so that the first scrape lists them) without resetting one that
//! already counts.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use duplex::metrics::{Kind, METRICS, Metric};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// A description as the recorder got it: kind, unit, help.
type Description = (Kind, Option<Unit>, String);

/// Records descriptions and keeps one atomic per registered series.
#[derive(Default)]
struct Recording {
    described: Mutex<BTreeMap<String, Description>>,
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

/// `name{k="v"}`, or `name` without labels.
fn series(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
        .collect();
    if labels.is_empty() {
        key.name().to_owned()
    } else {
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

impl Recorder for Recording {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.described.lock().unwrap().insert(
            key.as_str().to_owned(),
            (Kind::Counter, unit, description.to_string()),
        );
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.described.lock().unwrap().insert(
            key.as_str().to_owned(),
            (Kind::Gauge, unit, description.to_string()),
        );
    }

    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        panic!("duplex describes no histogram, yet {} was", key.as_str());
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        Counter::from_arc(Arc::clone(counters.entry(series(key)).or_default()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut gauges = self.gauges.lock().unwrap();
        Gauge::from_arc(Arc::clone(gauges.entry(series(key)).or_default()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        panic!("duplex registers no histogram, yet {} was", series(key));
    }
}

/// Every `counter!` / `gauge!` / `histogram!` with a literal name in the
/// crate's sources (the crate's own macros, which forward to the `metrics`
/// facade's): (name, kind, label key if any).
fn emitted() -> BTreeSet<(String, &'static str, Option<String>)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = BTreeSet::new();
    let mut files: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for kind in ["counter", "gauge", "histogram"] {
            let needle = format!("{kind}!(");
            for (at, _) in text.match_indices(&needle) {
                let rest = text[at + needle.len()..].trim_start();
                // `metrics::counter!(metric.name, ...)` in metrics.rs and
                // the forwarding macros in lib.rs emit no name of their own.
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                let (name, rest) = rest.split_once('"').unwrap();
                let rest = rest.trim_start();
                let label = rest
                    .strip_prefix(',')
                    .map(str::trim_start)
                    .and_then(|r| r.strip_prefix('"'))
                    .and_then(|r| r.split_once('"'))
                    .map(|(key, _)| key.to_owned());
                found.insert((name.to_owned(), kind, label));
            }
        }
    }
    found
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        _ => "other",
    }
}

fn listed(name: &str) -> &'static Metric {
    METRICS
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} is emitted but not in duplex::metrics::METRICS"))
}

#[test]
fn every_emitted_metric_is_listed_with_its_kind_and_label() {
    let emitted = emitted();
    assert!(
        emitted.len() >= 10,
        "the source scan found too little: {emitted:?}"
    );
    for (name, kind, label) in &emitted {
        let metric = listed(name);
        assert_eq!(kind_name(metric.kind), *kind, "{name}");
        assert_eq!(
            metric.label.map(|(key, _)| key),
            label.as_deref(),
            "{name}: label"
        );
    }
    for metric in METRICS {
        assert!(
            emitted.iter().any(|(name, _, _)| name == metric.name),
            "{} is listed but no longer emitted",
            metric.name
        );
    }
    let names: BTreeSet<_> = METRICS.iter().map(|m| m.name).collect();
    assert_eq!(names.len(), METRICS.len(), "a metric listed twice");
}

#[test]
fn describe_gives_each_metric_help_and_unit_and_registers_every_series_at_zero() {
    let recording = Recording::default();
    metrics::with_local_recorder(&recording, duplex::metrics::describe);
    let described = recording.described.lock().unwrap();
    let counters = recording.counters.lock().unwrap();
    let gauges = recording.gauges.lock().unwrap();
    for metric in METRICS {
        let (kind, unit, help) = described
            .get(metric.name)
            .unwrap_or_else(|| panic!("{} not described", metric.name));
        assert_eq!(*kind, metric.kind, "{}", metric.name);
        assert_eq!(*unit, Some(metric.unit), "{}", metric.name);
        assert!(help.len() > 10, "{}: help {help:?}", metric.name);
        let expected: Vec<String> = match metric.label {
            None => vec![metric.name.to_owned()],
            Some((key, values)) => values
                .iter()
                .map(|v| format!("{}{{{key}=\"{v}\"}}", metric.name))
                .collect(),
        };
        let registered = match metric.kind {
            Kind::Counter => &*counters,
            _ => &*gauges,
        };
        for series in expected {
            let value = registered
                .get(&series)
                .unwrap_or_else(|| panic!("{series} not registered"));
            assert_eq!(value.load(Ordering::SeqCst), 0, "{series}");
        }
    }
    assert!(
        described.get("duplex_bytes_sent_total").map(|d| d.1) == Some(Some(Unit::Bytes)),
        "byte counters are in bytes"
    );
}

#[test]
fn describing_again_resets_no_count() {
    let recording = Recording::default();
    metrics::with_local_recorder(&recording, || {
        duplex::metrics::describe();
        metrics::counter!("duplex_hub_published_total").increment(5);
        metrics::gauge!("duplex_sessions").set(3.0);
        duplex::metrics::describe();
    });
    let counters = recording.counters.lock().unwrap();
    assert_eq!(
        counters["duplex_hub_published_total"].load(Ordering::SeqCst),
        5
    );
    let gauges = recording.gauges.lock().unwrap();
    assert_eq!(
        f64::from_bits(gauges["duplex_sessions"].load(Ordering::SeqCst)),
        3.0
    );
}

#[test]
fn a_label_with_values_known_at_run_time_is_described_and_not_registered() {
    const LATER: &[Metric] = &[Metric {
        name: "app_links_up",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Links up, by peer (known once they connect).",
        label: Some(("peer", &[])),
    }];
    let recording = Recording::default();
    metrics::with_local_recorder(&recording, || duplex::metrics::describe_metrics(LATER));
    assert!(
        recording
            .described
            .lock()
            .unwrap()
            .contains_key("app_links_up")
    );
    assert!(recording.gauges.lock().unwrap().is_empty());
}
