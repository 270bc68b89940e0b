//! The `dynamollm` binary.

use anyhow::Result;
use clap::{Parser, Subcommand};
use dynamollm::cmd;
use std::process::ExitCode;

/// dynamollm: an energy manager for LLM inference clusters.
#[derive(Debug, Parser)]
#[command(name = "dynamollm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay a workload through the digital twin under a policy.
    Sim(cmd::sim::SimArgs),
    /// A hindsight reference for a workload: each window, each class's least-energy static pool, found by replay.
    Bound(cmd::bound::BoundArgs),
    /// The digital twin's own commands.
    #[command(subcommand)]
    Twin(cmd::twin::TwinCommand),
    /// The whole closed loop on embedded defaults: `serve` managing the twin as it replays the bundled Conversation hour.
    Demo(cmd::demo::DemoArgs),
    /// The always-on service: telemetry → forecasts → controller → actuators, with its HTTP API.
    Serve(cmd::serve::ServeArgs),
    /// The whole product on real sockets: `serve` managing `twin serve` engine processes through a cluster-manager script, a trace replayed through its router, then `sim` on the same trace.
    Rehearse(cmd::rehearse::RehearseArgs),
    /// Build a profile table by sweeping class × TP × clock × load on the twin or a real engine.
    Profile(cmd::profile::ProfileArgs),
    /// Accuracy of the output-class predictor on Azure traces.
    Predictor(cmd::predictor::PredictorArgs),
    /// Energy, carbon and cost of a period from the telemetry store (HTML, JSON or CSV).
    Report(cmd::report::ReportArgs),
    /// Load forecasting.
    #[command(subcommand)]
    Forecast(ForecastCommand),
    /// The node agent of an edge site: GPU and engine telemetry over MQTT, clock commands applied locally.
    Agent(cmd::agent::AgentArgs),
}

#[derive(Debug, Subcommand)]
enum ForecastCommand {
    /// Rolling-origin backtest of every forecast model on a rate curve.
    Backtest(cmd::forecast::BacktestArgs),
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Sim(a) => cmd::sim::run(&a).map(|_| true),
        Command::Bound(a) => cmd::bound::run(&a).map(|_| true),
        Command::Twin(t) => cmd::twin::run(&t),
        Command::Demo(a) => cmd::demo::run(&a).map(|_| true),
        Command::Serve(a) => cmd::serve::run(&a).map(|_| true),
        Command::Rehearse(a) => cmd::rehearse::run(&a).map(|_| true),
        Command::Profile(a) => cmd::profile::run(&a).map(|_| true),
        Command::Report(a) => cmd::report::run(&a).map(|_| true),
        Command::Predictor(a) => cmd::predictor::run(&a).map(|_| true),
        Command::Forecast(ForecastCommand::Backtest(a)) => cmd::forecast::backtest(&a).map(|_| true),
        Command::Agent(a) => cmd::agent::run(&a).map(|_| true),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
