//! `dynamollm profile`: build a profile table by sweeping a target, the twin
//! in virtual time or a real OpenAI-compatible engine over HTTP.

use super::{progress_bar, PhysicsArgs};
use crate::profile::http_target::{HttpTarget, HttpTargetOptions};
use crate::profile::sweep::{self, parse_clocks, SweepSpec};
use crate::profile::twin_target::TwinTarget;
use anyhow::{bail, Context, Result};
use sim::workload::conversation_lengths;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use telemetry::{LengthSamples, RequestClass};

/// Options of `dynamollm profile`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProfileArgs {
    /// `twin` (the digital twin, virtual time) or the base URL of an OpenAI-compatible engine.
    #[arg(long, default_value = "twin")]
    pub target: String,
    /// Classes to profile: `all` or a comma list (SS,SM,…).
    #[arg(long, default_value = "all")]
    pub classes: String,
    /// TP degrees (a real target serves one: give that one).
    #[arg(long, default_value = "2,4,8", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=64))]
    pub tp: Vec<u32>,
    /// Clocks: LO:HI:STEP (HI always included), a comma list, or `current` (do not set clocks).
    #[arg(long, alias = "clock", default_value = "800:1980:200")]
    pub clocks: String,
    /// Explicit loads in requests/s instead of the adaptive grid (each 0.001 to 1000000).
    #[arg(long, value_delimiter = ',', value_parser = super::flag::rate)]
    pub loads: Option<Vec<f64>>,
    /// The profile file (rows already there are kept and skipped).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Measurement window per point, seconds (virtual on the twin; 1 s to a week). Default: 300 on the twin, 60 on a URL.
    #[arg(long, value_parser = super::flag::window_s)]
    pub window_s: Option<f64>,
    /// On the twin, windows last long enough for at least this many requests (1 to 100000000).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub min_requests: u64,
    /// Request lengths per class come from this Azure trace (default: the bundled Conversation trace).
    #[arg(long, value_name = "FILE")]
    pub lengths: Option<PathBuf>,
    /// SLO = this × the class's unloaded latency (for the capacity probe and the grid; 1 to 1000).
    #[arg(long, default_value_t = 5.0, value_parser = super::flag::slo_multiplier)]
    pub slo_multiplier: f64,
    /// Refine a load interval when linear interpolation misses its midpoint by more than this (0.0001 to 1).
    #[arg(long, default_value_t = 0.02, value_parser = super::flag::tolerance)]
    pub refine_tolerance: f64,
    /// How many times an interval may be halved (0 to 10; 0: no refinement).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub refine_depth: u32,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// GPU access on a real target: `nvml`, or `twin` (the fake device over the target's `twin serve` endpoint).
    #[arg(long, default_value = "nvml")]
    pub gpu: String,
    /// The engine's API key (an engine started with `--api-key`), sent as `Authorization: Bearer KEY`.
    #[arg(long, value_name = "KEY", env = "DYNAMOLLM_API_KEY")]
    pub api_key: Option<String>,
    /// Model name to send and record (default: the first of the target's /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// GPU name to record (default: what the GPU device reports).
    #[arg(long)]
    pub gpu_name: Option<String>,
    /// First GPU index of the instance on the device (it uses `tp` GPUs from there; 0 to 1023).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1023))]
    pub first_gpu: u32,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

fn parse_classes(s: &str) -> Result<Vec<RequestClass>> {
    if s.trim() == "all" {
        return Ok(RequestClass::ALL.to_vec());
    }
    s.split(',').map(|c| RequestClass::parse(c.trim()).map_err(anyhow::Error::msg)).collect()
}

fn sweep_spec(args: &ProfileArgs, classes: Vec<RequestClass>, clocks_mhz: Vec<u32>, made_by: String) -> SweepSpec {
    SweepSpec {
        classes,
        tps: args.tp.clone(),
        clocks_mhz,
        loads_rps: args.loads.clone(),
        slo_multiplier: args.slo_multiplier,
        refine_tolerance: args.refine_tolerance,
        refine_depth: args.refine_depth,
        seed: args.seed,
        made_by,
    }
}

/// Run `dynamollm profile`.
pub fn run(args: &ProfileArgs) -> Result<()> {
    let classes = parse_classes(&args.classes)?;
    let lengths = match &args.lengths {
        Some(p) => LengthSamples::from_azure_trace(p).with_context(|| format!("reading {}", p.display()))?,
        None => conversation_lengths(),
    };
    let set_clocks = args.clocks.trim() != "current";
    let made_by =
        std::iter::once("dynamollm".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    let started = Instant::now();
    let bar = progress_bar(0, args.quiet, "{spinner} {pos} points measured, {elapsed} {msg}");
    let summary = if args.target == "twin" {
        if !set_clocks {
            bail!("--clocks current only applies to a real target");
        }
        let physics = args.physics.load()?;
        let clocks = parse_clocks(&args.clocks).map_err(anyhow::Error::msg)?;
        for &c in &clocks {
            if !physics.gpu.clocks_mhz.contains(&c) && c != physics.gpu.clock_max_mhz {
                bail!("clock {c} MHz is not one the twin's GPU supports ({:?})", physics.gpu.clocks_mhz);
            }
        }
        for &tp in &args.tp {
            if !physics.valid_tp(tp) {
                bail!("TP{tp} is not valid for the twin (the model must fit and TP divides the server)");
            }
        }
        let target = TwinTarget::new(physics, &lengths, args.window_s.unwrap_or(300.0), args.min_requests);
        let spec = sweep_spec(args, classes, clocks, made_by);
        sweep::run(&target, &spec, &args.out, &bar)?
    } else {
        if args.tp.len() != 1 {
            bail!("a real target serves one TP degree: give it with --tp (e.g. --tp 8), got {:?}", args.tp);
        }
        let target = HttpTarget::connect(HttpTargetOptions {
            base_url: args.target.clone(),
            gpu: args.gpu.clone(),
            model: args.model.clone(),
            gpu_name: args.gpu_name.clone(),
            first_gpu: args.first_gpu,
            tp: args.tp[0],
            set_clocks,
            window: Duration::from_secs_f64(args.window_s.unwrap_or(60.0)),
            lengths: &lengths,
            api_key: args.api_key.clone(),
        })?;
        let clocks = if set_clocks {
            parse_clocks(&args.clocks).map_err(anyhow::Error::msg)?
        } else {
            vec![target.current_clock_mhz()?]
        };
        target.check_clocks(&clocks)?;
        let spec = sweep_spec(args, classes, clocks, made_by);
        let result = sweep::run(&target, &spec, &args.out, &bar);
        let restored = target.restore_clocks();
        let summary = result?;
        restored?;
        summary
    };
    bar.finish_and_clear();
    eprintln!(
        "profile: {} points measured, {} resumed, {} rows in {} ({:.1} s)",
        summary.measured,
        summary.resumed,
        summary.rows,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
