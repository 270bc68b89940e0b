//! NVIDIA's DCGM exporter as a GPU source. Fleets that already run
//! `dcgm-exporter` on every node publish each GPU's power
//! (`DCGM_FI_DEV_POWER_USAGE`, W), its energy counter
//! (`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`, mJ since the driver loaded), its SM
//! clock (`DCGM_FI_DEV_SM_CLOCK`, MHz), utilisation and temperature, labelled
//! with the GPU's index (`gpu`), `UUID` and `Hostname`. The page is read line
//! by line with the engine scrape's parser: a malformed line or an implausible
//! value is an error naming the page and line, and the other GPUs' readings
//! are kept. Lines of a MIG instance (`GPU_I_ID`) are not the whole board's
//! and are passed over.

use crate::sample::{GpuSample, Tags};
use crate::scrape::{page_samples, SampleLine, ScrapeError};
use std::collections::BTreeMap;

/// The most power one GPU can plausibly draw (W): a reading above it is refused.
pub const MAX_GPU_POWER_W: f64 = 5_000.0;

/// One GPU's readings from a GPU page (a DCGM exporter's, or a `twin serve` engine's).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuReading {
    /// The GPU's index on its node (the `gpu` label).
    pub index: u32,
    /// Its UUID (`GPU-…`), when the page gives it.
    pub uuid: Option<String>,
    /// The node the exporter runs on (the `Hostname` label), when given.
    pub hostname: Option<String>,
    /// The GPU model (`modelName`), when given.
    pub model: Option<String>,
    /// Board power (W).
    pub power_w: Option<f64>,
    /// Energy counter since the driver loaded (J).
    pub energy_j: Option<f64>,
    /// SM clock (MHz).
    pub sm_clock_mhz: Option<u32>,
    /// Utilisation, 0–1.
    pub util: Option<f64>,
    /// Temperature (°C).
    pub temperature_c: Option<f64>,
}

/// A parsed GPU page: the GPUs by index, and the lines skipped.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuPage {
    /// The GPUs, by index.
    pub gpus: BTreeMap<u32, GpuReading>,
    /// Malformed or implausible lines, skipped.
    pub errors: Vec<ScrapeError>,
}

/// The series a page gives each GPU's readings in, and their units.
#[derive(Debug, Clone, Copy)]
pub struct GpuSeries {
    /// Board power, W.
    pub power_w: &'static str,
    /// Energy counter, and how many of its units make a joule.
    pub energy: (&'static str, f64),
    /// SM clock, MHz.
    pub sm_clock_mhz: &'static str,
    /// Utilisation, and how many of its units make 1 (100 for a percentage).
    pub util: Option<(&'static str, f64)>,
    /// Temperature, °C.
    pub temperature_c: Option<&'static str>,
}

/// NVIDIA's DCGM exporter.
pub const DCGM: GpuSeries = GpuSeries {
    power_w: "DCGM_FI_DEV_POWER_USAGE",
    energy: ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 1000.0),
    sm_clock_mhz: "DCGM_FI_DEV_SM_CLOCK",
    util: Some(("DCGM_FI_DEV_GPU_UTIL", 100.0)),
    temperature_c: Some("DCGM_FI_DEV_GPU_TEMP"),
};

/// The fake GPUs on a `dynamollm twin serve` engine's own page.
pub const TWIN: GpuSeries = GpuSeries {
    power_w: crate::gpu::twin_metrics::POWER_W,
    energy: (crate::gpu::twin_metrics::ENERGY_J, 1.0),
    sm_clock_mhz: crate::gpu::twin_metrics::SM_CLOCK_MHZ,
    util: None,
    temperature_c: None,
};

/// Read a DCGM exporter page. A page with no GPU reading at all is an error.
pub fn parse_dcgm_page(text: &str, page: &str) -> Result<GpuPage, ScrapeError> {
    parse_gpu_page(text, page, &DCGM)
}

/// Read the GPUs of a page whose series `names` gives. A page with no GPU
/// reading at all is an error.
pub fn parse_gpu_page(text: &str, page: &str, names: &GpuSeries) -> Result<GpuPage, ScrapeError> {
    let line_err = |n: usize, problem: String| ScrapeError::Line { page: page.into(), line: n + 1, problem };
    let out = gpu_page_from(page_samples(text), names, &line_err);
    if out.gpus.is_empty() {
        let first = out.errors.first().map(|e| format!(" (first error: {e})")).unwrap_or_default();
        return Err(ScrapeError::Page {
            page: page.into(),
            problem: format!("no GPU readings ({}){first}", names.power_w),
        });
    }
    Ok(out)
}

/// The GPUs of a set of samples (a page's lines, or the series of a
/// Prometheus query's answer): one computation for both. Each sample comes
/// with its place (a line's or a series' index) or why it could not be read;
/// `err` turns a place and a problem into the error that names it. A sample
/// that cannot be read, or holds an implausible value, costs only itself.
pub(crate) fn gpu_page_from<'a>(
    samples: impl IntoIterator<Item = (usize, Result<SampleLine<'a>, String>)>,
    names: &GpuSeries,
    err: &dyn Fn(usize, String) -> ScrapeError,
) -> GpuPage {
    let mut out = GpuPage::default();
    for (n, sample) in samples {
        let sample = match sample {
            Ok(s) => s,
            Err(problem) => {
                out.errors.push(err(n, problem));
                continue;
            }
        };
        let series = sample.name;
        let field = if series == names.power_w {
            0
        } else if series == names.energy.0 {
            1
        } else if series == names.sm_clock_mhz {
            2
        } else if names.util.is_some_and(|u| u.0 == series) {
            3
        } else if names.temperature_c == Some(series) {
            4
        } else {
            continue;
        };
        let label = |name: &str| sample.labels.iter().find(|(l, _)| *l == name).map(|(_, v)| v.clone());
        // A MIG instance's line (`GPU_I_ID`) is a slice of the GPU, not the board.
        if label("GPU_I_ID").is_some() {
            continue;
        }
        let Some(index) = label("gpu").and_then(|g| g.parse::<u32>().ok()) else {
            out.errors.push(err(n, format!("{} has no numeric gpu label", sample.name)));
            continue;
        };
        let v = sample.value;
        let (max, what) = match field {
            0 => (MAX_GPU_POWER_W, "W"),
            1 => (f64::MAX, "(energy units)"),
            2 => (10_000.0, "MHz"),
            3 => (names.util.map_or(1.0, |u| u.1), "(utilisation units)"),
            _ => (300.0, "°C"),
        };
        if !v.is_finite() || v < 0.0 || v > max {
            out.errors.push(err(n, format!("{} is {v} {what}, outside 0..={max}", sample.name)));
            continue;
        }
        let g = out.gpus.entry(index).or_insert_with(|| GpuReading { index, ..GpuReading::default() });
        g.uuid = g.uuid.take().or_else(|| label("UUID"));
        g.hostname = g.hostname.take().or_else(|| label("Hostname"));
        g.model = g.model.take().or_else(|| label("modelName"));
        match field {
            0 => g.power_w = Some(v),
            1 => g.energy_j = Some(v / names.energy.1),
            2 => g.sm_clock_mhz = Some(v.round() as u32),
            3 => g.util = Some(v / names.util.map_or(1.0, |u| u.1)),
            _ => g.temperature_c = Some(v),
        }
    }
    out
}

impl GpuPage {
    /// The GPU samples of the page, stamped `ts_ms`, with the `base` tags
    /// (site, node, instance) and each GPU's index; without a node in `base`,
    /// the page's `Hostname`. A GPU without a power reading gives none.
    pub fn samples(&self, ts_ms: i64, base: &Tags) -> Vec<GpuSample> {
        self.gpus
            .values()
            .filter_map(|g| {
                let node = base.node.clone().or_else(|| g.hostname.clone());
                Some(GpuSample {
                    ts_ms,
                    tags: Tags { node, gpu: Some(g.index), ..base.clone() },
                    power_w: g.power_w?,
                    energy_j: g.energy_j,
                    sm_clock_mhz: g.sm_clock_mhz,
                    util: g.util,
                    temperature_c: g.temperature_c,
                    throttle_reasons: None,
                })
            })
            .collect()
    }
}
