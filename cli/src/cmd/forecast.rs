//! `dynamollm forecast backtest`: rolling-origin backtest of every forecast
//! model on a rate curve turned into seeded Poisson arrivals (total requests
//! per step, or per request class with a length trace), printed as a table
//! and optionally written as JSON and as an SVG chart of actual against
//! forecast with its band.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use forecast::{backtest as run_backtest, BacktestConfig, BacktestRun, ForecastConfig, Forecaster, ModelKind};
use serde_json::{json, Value};
use telemetry::series::class_series;
use telemetry::trace::{LengthSamples, PoissonArrivals, RateCurve};
use telemetry::{ClassBoundaries, RequestClass, CLASS_COUNT};

/// Arguments of `forecast backtest`.
#[derive(Debug, Clone, clap::Args)]
pub struct BacktestArgs {
    /// Rate curve (`minute,rate_lo,rate_mid,rate_hi`, requests/min).
    #[arg(long)]
    pub rates: PathBuf,
    /// Azure trace to draw request lengths from; enables per-class series.
    #[arg(long)]
    pub lengths: Option<PathBuf>,
    /// `all` (the total, plus every class with --lengths) or one class (`SS`, `ML`, ...).
    #[arg(long, default_value = "all")]
    pub class: String,
    /// Days of history before the first forecast origin.
    #[arg(long)]
    pub train_days: u32,
    /// Minutes forecast from each origin.
    #[arg(long)]
    pub horizon_min: u32,
    /// Minutes per series point.
    #[arg(long, default_value_t = 1)]
    pub step_min: u32,
    /// Seed of the Poisson arrivals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the scores as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a chart of actual against the best model's forecast here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// One series' backtest: every model's run and the best by MASE.
struct SeriesResult {
    name: String,
    runs: Vec<BacktestRun>,
    best: usize,
}

impl SeriesResult {
    fn json(&self) -> Value {
        let models: Vec<Value> = self
            .runs
            .iter()
            .map(|r| {
                json!({
                    "name": r.score.kind.name(),
                    "mase": r.score.mase,
                    "smape": r.score.smape_pct,
                    "coverage_95": r.score.coverage,
                    "peak_capture": r.score.peak_capture,
                })
            })
            .collect();
        json!({ "models": models, "best": self.runs[self.best].score.kind.name() })
    }

    fn print(&self, horizon_min: u32) {
        println!(
            "{} — horizon {horizon_min} min, {} origins",
            self.name,
            self.runs.first().map(|r| r.score.origins).unwrap_or(0)
        );
        println!(
            "  {:<16} {:>7} {:>9} {:>9} {:>12} {:>10}",
            "model", "MASE", "sMAPE %", "cov 95%", "peak capt.", "MAE"
        );
        for (i, r) in self.runs.iter().enumerate() {
            let s = &r.score;
            println!(
                "  {:<16} {:>7.3} {:>9.2} {:>9.3} {:>12.3} {:>10.2}{}",
                s.kind.name(),
                s.mase,
                s.smape_pct,
                s.coverage,
                s.peak_capture,
                s.mae,
                if i == self.best { "  ← best" } else { "" }
            );
        }
    }
}

/// Run the backtest and write what was asked.
pub fn backtest(args: &BacktestArgs) -> anyhow::Result<()> {
    if args.step_min == 0 || args.horizon_min == 0 || args.train_days == 0 {
        bail!("--step-min, --horizon-min and --train-days must be at least 1");
    }
    if args.horizon_min % args.step_min != 0 || 1440 % args.step_min != 0 {
        bail!(
            "--horizon-min ({}) and a day (1440) must be whole multiples of --step-min ({})",
            args.horizon_min,
            args.step_min
        );
    }
    let wanted: Option<RequestClass> = if args.class.eq_ignore_ascii_case("all") {
        None
    } else {
        if args.lengths.is_none() {
            bail!(
                "--class {} needs --lengths: without a length trace there is only the total (`--class all`)",
                args.class
            );
        }
        Some(RequestClass::parse(&args.class).map_err(|e| anyhow::anyhow!("--class: {e}"))?)
    };

    let curve =
        RateCurve::load(&args.rates).with_context(|| format!("reading the rate curve {}", args.rates.display()))?;
    let lengths = match &args.lengths {
        Some(p) => {
            LengthSamples::from_azure_trace(p).with_context(|| format!("reading the length trace {}", p.display()))?
        }
        None => LengthSamples::from_pairs("(no length trace)", vec![(1, 1)]),
    };
    let span_s = curve.span_minutes() as f64 * 60.0;
    let arrivals = PoissonArrivals::new(curve, lengths, args.seed);
    let step_s = f64::from(args.step_min) * 60.0;
    let series = class_series(arrivals, &ClassBoundaries::default(), step_s, Some(span_s))
        .context("binning the arrivals into per-class series")?;

    let day_steps = (1440 / args.step_min) as usize;
    let train_steps = args.train_days as usize * day_steps;
    let horizon_steps = (args.horizon_min / args.step_min) as usize;
    if train_steps + horizon_steps > series.len() {
        bail!(
            "the curve has {} minutes; --train-days {} plus --horizon-min {} need {}",
            series.len() * args.step_min as usize,
            args.train_days,
            args.horizon_min,
            (train_steps + horizon_steps) * args.step_min as usize
        );
    }
    let forecaster = Forecaster::new(ForecastConfig::with_step_min(args.step_min))?;
    let bt = BacktestConfig::new(train_steps, horizon_steps, args.step_min);

    let run_series = |name: String, values: &[f64]| -> anyhow::Result<SeriesResult> {
        let mut runs = Vec::new();
        for kind in ModelKind::ALL {
            let run = run_backtest(values, kind, &forecaster, &bt)
                .with_context(|| format!("backtesting {kind} on {name}"))?;
            runs.push(run);
        }
        let best = runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.score.mase.is_finite())
            .min_by(|a, b| a.1.score.mase.total_cmp(&b.1.score.mase))
            .map(|(i, _)| i)
            .unwrap_or(0);
        Ok(SeriesResult { name, runs, best })
    };

    let (main, classes) = match wanted {
        Some(class) => (run_series(format!("class {class}"), series.class_requests(class))?, Vec::new()),
        None => {
            let total = run_series("all classes (total requests/step)".into(), &series.total_requests())?;
            let mut classes = Vec::new();
            if args.lengths.is_some() {
                for i in 0..CLASS_COUNT {
                    let class = RequestClass::from_index(i);
                    classes.push((class, run_series(format!("class {class}"), series.class_requests(class))?));
                }
            }
            (total, classes)
        }
    };

    main.print(args.horizon_min);
    for (_, c) in &classes {
        c.print(args.horizon_min);
    }

    if let Some(path) = &args.json {
        let mut doc = main.json();
        if !classes.is_empty() {
            let map: serde_json::Map<String, Value> = classes.iter().map(|(c, r)| (c.name(), r.json())).collect();
            doc["classes"] = Value::Object(map);
        }
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let values = match wanted {
            Some(class) => series.class_requests(class).to_vec(),
            None => series.total_requests(),
        };
        chart(path, &main, &values, args.step_min, bt.origin_stride_steps)
            .with_context(|| format!("writing the chart {}", path.display()))?;
    }
    Ok(())
}

/// Actual series against the best model's forecasts: each origin's first
/// `stride` steps, as a mean line inside its band.
fn chart(path: &Path, result: &SeriesResult, actual: &[f64], step_min: u32, stride: usize) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let run = &result.runs[result.best];
    let Some(first_origin) = run.forecasts.first().map(|f| f.0) else {
        bail!("no forecast to draw");
    };
    let mut mean = Vec::new();
    let mut band_hi = Vec::new();
    let mut band_lo = Vec::new();
    for (origin, f) in &run.forecasts {
        for k in 0..stride.min(f.len()) {
            let x = (origin + k) as f64 * f64::from(step_min) / 60.0;
            mean.push((x, f.mean[k]));
            band_hi.push((x, f.upper[k]));
            band_lo.push((x, f.lower[k]));
        }
    }
    let x_end = mean.last().map(|p| p.0).unwrap_or(0.0);
    let x0 = first_origin as f64 * f64::from(step_min) / 60.0;
    let actual_pts: Vec<(f64, f64)> = actual
        .iter()
        .enumerate()
        .map(|(i, &y)| (i as f64 * f64::from(step_min) / 60.0, y))
        .filter(|(x, y)| *x >= x0 && *x <= x_end && y.is_finite())
        .collect();
    let y_max = band_hi.iter().chain(&actual_pts).map(|p| p.1).fold(0.0_f64, f64::max) * 1.05;

    let root = SVGBackend::new(path, (1400, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: actual vs {} forecast, {:.0}% band",
                result.name,
                run.score.kind.name(),
                run.forecasts[0].1.level * 100.0
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x_end.max(x0 + 1.0), 0.0..y_max.max(1.0))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("hours since the start of the curve")
        .y_desc(format!("requests per {step_min} min"))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let band: Vec<(f64, f64)> = band_hi.iter().copied().chain(band_lo.iter().rev().copied()).collect();
    chart
        .draw_series(std::iter::once(Polygon::new(band, BLUE.mix(0.2).filled())))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("band")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], BLUE.mix(0.2).filled()));
    chart
        .draw_series(LineSeries::new(actual_pts, BLACK.mix(0.6).stroke_width(1)))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("actual")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], BLACK));
    chart
        .draw_series(LineSeries::new(mean, RED.stroke_width(1)))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("forecast mean")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
