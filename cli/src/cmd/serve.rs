//! `dynamollm serve --config FILE`: the always-on service (see `service`).

use anyhow::Result;
use service::{self as serve, config::ServiceConfig};
use std::path::PathBuf;

/// Options of `dynamollm serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The service's config file (see deploy/dynamollm.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Run the service until SIGINT or SIGTERM.
pub fn run(args: &ServeArgs) -> Result<()> {
    let mut cfg = ServiceConfig::load(&args.config)?;
    if cfg.cluster.kind == "twin" && cfg.cluster.baseline_instances.is_none() {
        // The live baseline on the twin: `single-pool` as `sim` sizes it, replayed beside the cluster.
        let (physics, workload) = serve::twin::physics_and_workload(&cfg)?;
        eprintln!("dynamollm serve: sizing the single-pool baseline by replay on the twin's workload…");
        let counts = super::sim::size_by_replay(
            &physics,
            controller::policy::Policy::SinglePool,
            &workload,
            cfg.service.slo_multiplier,
            true,
        )?;
        cfg.cluster.baseline_instances = counts.first().copied();
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let svc = serve::start(cfg).await?;
        eprintln!("dynamollm serve: API on http://{}", svc.addr);
        let mut finished = svc.finished.clone();
        let mut reported = false;
        loop {
            tokio::select! {
                _ = shutdown_signal() => break,
                r = finished.changed(), if !reported => {
                    if r.is_err() {
                        reported = true;
                        continue;
                    }
                    let totals = finished.borrow().clone();
                    if let Some(t) = totals {
                        reported = true;
                        eprintln!(
                            "dynamollm serve: the twin's workload is over ({:.2} kWh of GPU energy); the API stays up until SIGTERM",
                            t.energy_j / 3.6e6
                        );
                    }
                }
            }
        }
        eprintln!("dynamollm serve: shutting down (clocks reset, state saved)");
        svc.stop().await
    })
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
