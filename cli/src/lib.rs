//! dynamollm: the command line. Each of the `dynamollm` binary's commands
//! (`cmd`), and what only the command line needs: the twin's closed-loop
//! driver (`closed_loop`), the paper's baselines sized by replay
//! (`baseline`), what `assess` reads from a fleet's history (`assess`), `bound`'s hindsight reference, the profiler and its targets
//! (`profile`), the load generator (`loadgen`), the twin's HTTP face
//! (`twin_serve`, `twin_metrics`) and the reports of `sim` runs (`report`).
//! The controller, the service and the agent are crates of their own.
#![forbid(unsafe_code)]

pub mod assess;
pub mod baseline;
pub mod closed_loop;
pub mod cmd;
pub mod loadgen;
pub mod profile;
pub mod report;
pub mod twin_metrics;
pub mod twin_serve;
