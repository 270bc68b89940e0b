//! `dynamollm twin …`: the digital twin's own commands (`anchors`: calibration).

use super::{write_json, PhysicsArgs};
use crate::profile::accuracy::{by_class, evaluate, held_out_points};
use crate::profile::twin_target::TwinTarget;
use crate::twin_serve::{router, ServeConfig};
use anyhow::{Context, Result};
use controller::profile::ProfileTable;
use sim::workload::conversation_lengths;
use std::path::PathBuf;

/// `dynamollm twin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TwinCommand {
    /// Measure the calibration anchors of docs/twin.md in the twin.
    Anchors(AnchorsArgs),
    /// Check a profile against fresh twin measurements at held-out loads (MAPE per class).
    Accuracy(AccuracyArgs),
    /// Serve one twin instance as an OpenAI-compatible engine with vLLM's /metrics.
    Serve(ServeArgs),
}

/// Options of `dynamollm twin serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// Tensor-parallel degree of the instance (1 to 8).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub tp: u32,
    /// GPU clock at start (and after a reset), MHz (1 to 100000).
    #[arg(long, default_value_t = 1980, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clock_mhz: u32,
    /// Virtual seconds per wall second (latencies the clients see shrink by this factor; 0.01 to 10000).
    #[arg(long, default_value_t = 1.0, value_parser = super::flag::speed)]
    pub speed: f64,
    /// Model name served.
    #[arg(long)]
    pub model: Option<String>,
    /// Count first tokens and token gaps against per-class SLOs of this multiple of
    /// each class's median request alone on TP8 at max clock (`dynamollm_twin_slo_total`; 1 to 1000).
    #[arg(long, default_value_t = 5.0, value_parser = super::flag::slo_multiplier)]
    pub slo_multiplier: f64,
    /// The trace whose lengths give the class medians (default: the bundled Conversation trace).
    #[arg(long, value_name = "FILE")]
    pub lengths: Option<PathBuf>,
    /// Require this key from clients (`Authorization: Bearer KEY`) on `/v1/*` and `/tokenize`, as vLLM's `--api-key`.
    #[arg(long, value_name = "KEY", env = "DYNAMOLLM_TWIN_API_KEY")]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// Options of `dynamollm twin accuracy`.
#[derive(Debug, Clone, clap::Args)]
pub struct AccuracyArgs {
    /// The profile to check (default: the bundled one).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Measurement window, as for `dynamollm profile` (1 s to a week).
    #[arg(long, default_value_t = 300.0, value_parser = super::flag::window_s)]
    pub window_s: f64,
    /// Minimum requests per window, as for `dynamollm profile` (1 to 100000000).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub min_requests: u64,
    /// Request lengths per class come from this Azure trace; give the one the profile was made with
    /// (default: the bundled Conversation trace).
    #[arg(long, value_name = "FILE")]
    pub lengths: Option<PathBuf>,
    /// Seed of the fresh measurements (differs from the sweep's).
    #[arg(long, default_value_t = 7919)]
    pub seed: u64,
    /// Write every held-out point and the MAPEs here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// Options of `dynamollm twin anchors`.
#[derive(Debug, Clone, clap::Args)]
pub struct AnchorsArgs {
    /// Write `{"anchors":[…]}` to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// Run a twin subcommand. Returns whether everything passed.
pub fn run(cmd: &TwinCommand) -> Result<bool> {
    match cmd {
        TwinCommand::Anchors(a) => anchors(a),
        TwinCommand::Accuracy(a) => accuracy(a).map(|_| true),
        TwinCommand::Serve(a) => serve(a).map(|_| true),
    }
}

fn serve(args: &ServeArgs) -> Result<()> {
    let physics = args.physics.load()?;
    let lengths = match &args.lengths {
        Some(p) => telemetry::trace::LengthSamples::from_azure_trace(p)?,
        None => conversation_lengths(),
    };
    let slo = sim::measure::class_slos(
        &physics,
        lengths.pairs(),
        &telemetry::ClassBoundaries::default(),
        sim::measure::SloRule::Multiplier(args.slo_multiplier),
    );
    let cfg = ServeConfig {
        model: args.model.clone().unwrap_or_else(|| physics.model.name.clone()),
        physics,
        tp: args.tp,
        clock_mhz: args.clock_mhz,
        speed: args.speed,
        slo: Some(slo),
        api_key: args.api_key.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let app = router(cfg).map_err(anyhow::Error::msg)?;
        eprintln!("twin serve: listening on http://{}", listener.local_addr()?);
        // Tokens go out one small SSE write at a time: without TCP_NODELAY, Nagle holds
        // each write until the client ACKs the previous one (delayed ACKs add tens of ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            // SIGINT or SIGTERM: stop taking connections, finish the streams in flight.
            .with_graceful_shutdown(super::serve::shutdown_signal())
            .await?;
        Ok(())
    })
}

fn accuracy(args: &AccuracyArgs) -> Result<()> {
    let table = match &args.profile {
        Some(p) => ProfileTable::load(p)?,
        None => ProfileTable::bundled(),
    };
    let lengths = match &args.lengths {
        Some(p) => telemetry::LengthSamples::from_azure_trace(p).with_context(|| format!("reading {}", p.display()))?,
        None => conversation_lengths(),
    };
    let target = TwinTarget::new(args.physics.load()?, &lengths, args.window_s, args.min_requests);
    let points = held_out_points(&table);
    let held = evaluate(&table, &target, &points, args.seed)?;
    let rows = by_class(&held);
    println!("held-out loads between profiled ones, within the SLO range; MAPE of the profile's estimate");
    println!("{:<6} {:>7} {:>18} {:>13} {:>12}", "class", "points", "energy_per_req_%", "ttft_p99_%", "tbt_p99_%");
    for (c, m) in &rows {
        println!(
            "{:<6} {:>7} {:>18.2} {:>13.2} {:>12.2}",
            c, m.points, m.energy_per_req_pct, m.ttft_p99_pct, m.tbt_p99_pct
        );
    }
    if let Some(path) = &args.json {
        let mapes: serde_json::Map<String, serde_json::Value> =
            rows.iter().map(|(c, m)| (c.clone(), serde_json::to_value(m).expect("plain data"))).collect();
        write_json(path, &serde_json::json!({ "profile": table.path, "mape": mapes, "points": held }))?;
    }
    Ok(())
}

fn anchors(args: &AnchorsArgs) -> Result<bool> {
    let physics = args.physics.load()?;
    let anchors = ::sim::anchors::measure_all(&physics, &conversation_lengths());
    println!("{:<5} {:<4} {:<86} {:>22}  expected", "id", "", "anchor", "measured");
    for a in &anchors {
        let measured = match &a.measured {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        println!(
            "{:<5} {:<4} {:<86} {:>22}  {}",
            a.id,
            if a.pass { "pass" } else { "FAIL" },
            a.name,
            measured,
            a.expected
        );
    }
    let passed = anchors.iter().filter(|a| a.pass).count();
    println!("{passed} of {} anchors pass", anchors.len());
    if let Some(path) = &args.json {
        write_json(path, &serde_json::json!({ "anchors": anchors }))?;
    }
    Ok(passed == anchors.len())
}
