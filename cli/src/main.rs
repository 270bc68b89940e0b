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

// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// The same controller settings on traffic they were not tuned on: the Coding week, its curve with
    /// Conversation lengths, the Conversation hour at several scales, each at several seeds, in one table.
    Robustness(cmd::robustness::RobustnessArgs),
    /// What dynamollm would have saved on a fleet, from its history in Prometheus: the workload and the
    /// fleet's layout read, replayed in the twin under that layout and under dynamollm, beside the
    /// measured energy.
    Assess(cmd::assess::AssessArgs),
    /// Check a service or agent config file: every key and range, the files it names, and (unless --offline)
    /// the broker, store and endpoints it names; prints what would run.
    Check(cmd::check::CheckArgs),
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
        Command::Check(a) => cmd::check::run(&a).map(|_| true),
        Command::Assess(a) => cmd::assess::run(&a).map(|_| true),
        Command::Robustness(a) => cmd::robustness::run(&a).map(|rows| rows.iter().all(|r| r.holds)),
    }
}

fn main() -> ExitCode {
    // A panic anywhere (any thread, any task of `serve` or `agent`) ends the process with
    // status 101 after the usual message, so systemd restarts it instead of it running on
    // with a dead task. Nothing in the binary catches panics.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(101);
    }));
    let cli = Cli::parse();
    // The services log what an operator needs at info unless RUST_LOG says
    // otherwise; the one-shot commands only their errors (they say what they do on stdout).
    let default = match cli.command {
        Command::Serve(_) | Command::Agent(_) => "info",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
