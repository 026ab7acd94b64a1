//! Prometheus metrics in the text exposition format, kept in atomics so the engine thread and the
//! HTTP handlers update them without locks on the hot path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A cumulative histogram with fixed upper bounds.
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in micro-units, so it fits an atomic integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if v <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

const SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Everything `/metrics` reports.
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub tokens_in: Counter,
    pub tokens_out: Counter,
    pub cached_prompt_tokens: Counter,
    pub cancelled: Counter,
    pub queue_depth: Gauge,
    pub batch_size: Histogram,
    pub time_to_first_token: Histogram,
    pub latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            tokens_in: Counter::default(),
            tokens_out: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            cancelled: Counter::default(),
            queue_depth: Gauge::default(),
            batch_size: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            time_to_first_token: Histogram::new(SECONDS),
            latency: Histogram::new(SECONDS),
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((route.to_string(), status)).or_default() += 1;
        drop(map);
        self.latency.observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP wordloom_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE wordloom_requests_total counter\n");
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        for ((route, status), n) in map.iter() {
            let _ = writeln!(
                out,
                "wordloom_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        drop(map);
        for (name, help, value) in [
            (
                "wordloom_prompt_tokens_total",
                "Prompt tokens received.",
                self.tokens_in.get(),
            ),
            (
                "wordloom_cached_prompt_tokens_total",
                "Prompt tokens copied from the prompt cache instead of computed.",
                self.cached_prompt_tokens.get(),
            ),
            (
                "wordloom_generated_tokens_total",
                "Tokens generated.",
                self.tokens_out.get(),
            ),
            (
                "wordloom_cancelled_sequences_total",
                "Sequences dropped because their client went away.",
                self.cancelled.get(),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP wordloom_queue_depth Sequences waiting for a batch slot.\n# TYPE wordloom_queue_depth gauge\nwordloom_queue_depth {}",
            self.queue_depth.get()
        );
        self.batch_size.render(
            &mut out,
            "wordloom_batch_size",
            "Sequences per decode step.",
        );
        self.time_to_first_token.render(
            &mut out,
            "wordloom_time_to_first_token_seconds",
            "From submission to the first generated token.",
        );
        self.latency.render(
            &mut out,
            "wordloom_request_duration_seconds",
            "Request handling time (streams: until the last event).",
        );
        out
    }
}
