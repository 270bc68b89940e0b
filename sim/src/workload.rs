//! Workloads for replay: an Azure trace at its own timestamps, or a rate
//! curve turned into seeded Poisson arrivals with lengths drawn from a trace;
//! scaled, limited to a span, and the length pairs the SLOs are derived from.

use anyhow::{bail, Context, Result};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use telemetry_core::trace::{AzureTrace, Limited, PoissonArrivals, RateCurve, Scaled};
use telemetry_core::{ClassBoundaries, LengthSamples, Request, RequestClass, TraceError};

/// The bundled Conversation hour (Azure LLM inference trace 2023, CC-BY 4.0;
/// see `data/README.md`), embedded so the demo runs with no files around it.
pub const CONV_TRACE_CSV: &str = include_str!("../../data/azure-llm-2023-conv.csv");
/// The name the embedded trace goes by.
pub const CONV_TRACE_NAME: &str = "data/azure-llm-2023-conv.csv";

/// Mixed into the workload seed for the twin's injected misclassification
/// (the router's output-class predictor being wrong at `predictor_accuracy`).
pub const PREDICTOR_SEED: u64 = 0x0075_7470_7574;

/// Most length pairs kept for deriving SLOs from a trace (its first ones).
const SLO_SAMPLE_MAX: usize = 2_000_000;

/// Where requests come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An Azure trace file replayed at its own timestamps (`None`: the embedded Conversation hour).
    Trace(Option<PathBuf>),
    /// A rate curve with lengths drawn from a trace.
    Rates {
        /// The rate curve.
        curve: RateCurve,
        /// The lengths.
        lengths: LengthSamples,
    },
}

/// How far (s) the copies `--scale` makes of a trace's requests may trail the
/// original: a minute, so per-minute rates keep their shape while the copies
/// arrive independently instead of as bursts of identical requests.
pub const SCALE_SPREAD_S: f64 = 60.0;

/// A replayable workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The source.
    pub source: Source,
    /// Load multiplier.
    pub scale: f64,
    /// Span limit, hours.
    pub hours: Option<f64>,
    /// Seed for everything random.
    pub seed: u64,
    /// Human name (the `trace` field of reports).
    pub name: String,
    /// (prompt, output) pairs the per-class SLOs are derived from.
    pub slo_pairs: Vec<(u32, u32)>,
    /// Span of the arrivals in seconds, when known.
    pub span_s: Option<f64>,
    /// How often the router's prediction of a request's output class is right
    /// (1: it knows; below 1, the rest go to another output band's pool).
    pub predictor_accuracy: f64,
}

type Arrivals = Box<dyn Iterator<Item = Result<Request, TraceError>>>;

impl Workload {
    /// Build from the command-line options.
    pub fn from_options(
        trace: Option<&Path>,
        rates: Option<&Path>,
        lengths: Option<&Path>,
        scale: f64,
        hours: Option<f64>,
        seed: u64,
    ) -> Result<Workload> {
        if !(scale.is_finite() && scale > 0.0) {
            bail!("--scale must be a positive number, got {scale}");
        }
        if let Some(h) = hours {
            if !(h.is_finite() && h > 0.0) {
                bail!("--hours must be a positive number, got {h}");
            }
        }
        match (trace, rates, lengths) {
            (Some(_), Some(_), _) => bail!("give either --trace or --rates/--lengths, not both"),
            (None, Some(r), Some(l)) => {
                let curve = RateCurve::load(r)?;
                let lengths = LengthSamples::from_azure_trace(l)?;
                let mut span_s = curve.span_minutes() as f64 * 60.0;
                if let Some(h) = hours {
                    span_s = span_s.min(h * 3600.0);
                }
                Ok(Workload {
                    name: format!("{} (lengths: {})", r.display(), l.display()),
                    slo_pairs: lengths.pairs().to_vec(),
                    source: Source::Rates { curve, lengths },
                    scale,
                    hours,
                    seed,
                    span_s: Some(span_s),
                    predictor_accuracy: 1.0,
                })
            }
            (None, Some(_), None) => bail!("--rates needs --lengths FILE (an Azure trace to draw token lengths from)"),
            (None, None, Some(_)) => bail!("--lengths goes with --rates"),
            (t, None, _) => {
                let mut w = Workload {
                    source: Source::Trace(t.map(Path::to_path_buf)),
                    scale,
                    hours,
                    seed,
                    name: t.map(|p| p.display().to_string()).unwrap_or_else(|| CONV_TRACE_NAME.to_string()),
                    slo_pairs: Vec::new(),
                    span_s: None,
                    predictor_accuracy: 1.0,
                };
                // First pass: validates every line and gathers lengths and the span.
                let mut last = 0.0_f64;
                for r in w.raw_trace()? {
                    let r = r?;
                    if w.slo_pairs.len() < SLO_SAMPLE_MAX {
                        w.slo_pairs.push((r.input_tokens, r.output_tokens));
                    }
                    last = r.arrival_s;
                }
                if w.slo_pairs.is_empty() {
                    bail!("{}: the trace has no requests", w.name);
                }
                w.span_s = Some(hours.map(|h| (h * 3600.0).min(last)).unwrap_or(last));
                Ok(w)
            }
        }
    }

    /// The bundled Conversation hour at scale 1.
    pub fn bundled_conversation(seed: u64) -> Workload {
        Workload::from_options(None, None, None, 1.0, None, seed).expect("the embedded trace is valid")
    }

    fn raw_trace(&self) -> Result<Arrivals> {
        match &self.source {
            Source::Trace(Some(p)) => Ok(Box::new(AzureTrace::open(p)?)),
            Source::Trace(None) => Ok(Box::new(AzureTrace::from_reader(
                Path::new(CONV_TRACE_NAME),
                Cursor::new(CONV_TRACE_CSV.as_bytes()),
            )?)),
            Source::Rates { .. } => bail!("not a trace workload"),
        }
    }

    /// A fresh arrival stream (the same one every call, for a given seed).
    pub fn arrivals(&self) -> Result<Arrivals> {
        let base: Arrivals = match &self.source {
            Source::Trace(_) => {
                let raw = self.raw_trace()?;
                if (self.scale - 1.0).abs() < 1e-12 {
                    raw
                } else {
                    Box::new(Scaled::new(raw, self.scale, SCALE_SPREAD_S, self.seed))
                }
            }
            Source::Rates { curve, lengths } => {
                Box::new(PoissonArrivals::with_scale(curve.clone(), lengths.clone(), self.seed, self.scale))
            }
        };
        Ok(match self.hours {
            Some(h) => Box::new(Limited::new(base, h * 3600.0)),
            None => base,
        })
    }
}

impl Workload {
    /// Each arrival's time and class (the default class boundaries), streamed:
    /// what per-minute class counts are made of.
    pub fn class_arrivals(&self) -> Result<impl Iterator<Item = Result<(f64, RequestClass), TraceError>>> {
        let b = ClassBoundaries::default();
        Ok(self.arrivals()?.map(move |r| r.map(|r| (r.arrival_s, b.classify(r.input_tokens, r.output_tokens.max(1))))))
    }

    /// The same workload cut to its first `hours`.
    pub fn first_hours(&self, hours: f64) -> Workload {
        Workload { hours: Some(hours), ..self.clone() }
    }
}

/// Read the embedded Conversation lengths.
pub fn conversation_lengths() -> LengthSamples {
    LengthSamples::from_requests(
        Path::new(CONV_TRACE_NAME),
        AzureTrace::from_reader(Path::new(CONV_TRACE_NAME), Cursor::new(CONV_TRACE_CSV.as_bytes()))
            .expect("the embedded trace has a header"),
    )
    .context("the embedded trace")
    .expect("the embedded trace is valid")
}
