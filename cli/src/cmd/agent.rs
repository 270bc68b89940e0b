//! `dynamollm agent --config FILE`: the node agent of an edge site (see
//! the `agent` crate). Runs until SIGTERM or ctrl-c, then unlocks the clocks
//! it locked, publishes its dead state and disconnects.

use anyhow::{Context, Result};
use std::path::PathBuf;

/// Options of `dynamollm agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The agent's TOML config (an `[agent]` table; see deploy/dynamollm-agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Resolves on SIGTERM or ctrl-c (SIGINT).
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM ({e}); stopping on ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Run the agent.
pub fn run(args: &AgentArgs) -> Result<()> {
    let cfg = agent::AgentConfig::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(agent::run(cfg, terminated()))?;
    Ok(())
}
