//! Per-collector counters: samples delivered and errors, with the last error
//! kept for logs and status pages. The counters are Prometheus counters, so a
//! service exports them by registering them.

use prometheus::{IntCounter, Opts, Registry};
use std::fmt::Display;
use std::sync::{Arc, Mutex};

/// Counters of one collector.
#[derive(Debug)]
pub struct CollectorStats {
    name: String,
    samples: IntCounter,
    errors: IntCounter,
    last_error: Mutex<Option<String>>,
}

impl CollectorStats {
    /// Counters for the collector `name` (the `collector` label).
    pub fn new(name: &str) -> Arc<CollectorStats> {
        let counter = |metric: &str, help: &str| {
            IntCounter::with_opts(Opts::new(metric, help).const_label("collector", name))
                .expect("static metric names are valid")
        };
        Arc::new(CollectorStats {
            name: name.to_string(),
            samples: counter("dynamollm_collector_samples_total", "Samples delivered by the collector"),
            errors: counter("dynamollm_collector_errors_total", "Errors met by the collector (bad input, I/O)"),
            last_error: Mutex::new(None),
        })
    }

    /// The collector's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Count `n` samples delivered.
    pub fn add_samples(&self, n: usize) {
        self.samples.inc_by(n as u64);
    }

    /// Count an error and keep it as the last one.
    pub fn record_error(&self, e: &dyn Display) {
        self.errors.inc();
        let text = e.to_string();
        tracing::warn!(collector = %self.name, "{text}");
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(text);
        }
    }

    /// Samples delivered so far.
    pub fn samples(&self) -> u64 {
        self.samples.get()
    }

    /// Errors so far.
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }

    /// The last error's message.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }

    /// Register the counters with a Prometheus registry.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.samples.clone()))?;
        registry.register(Box::new(self.errors.clone()))
    }
}
