//! The policies: the paper's static baselines (`single-pool`, `multi-pool`)
//! and the controlled ones, each a set of the controller's loops.

use telemetry_core::{RequestClass, CLASS_COUNT};

/// A policy `dynamollm sim --policy` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// One pool of TP8 instances at max clock for every class.
    SinglePool,
    /// One pool per class, TP8 at max clock.
    MultiPool,
    /// One pool; instance count follows the forecast (TP8, top clock).
    ScaleInst,
    /// A pool per class; TP degrees change within a fixed cluster's GPUs (`sim` gives it
    /// single-pool's, sized for the peak), shared among the pools by need; no scale-in, top clock.
    ScaleShard,
    /// The single-pool layout; clocks follow the load.
    ScaleFreq,
    /// A pool per class; all three loops.
    DynamoLlm,
    /// DynamoLLM knowing the future and reconfiguring for free: the reference below it.
    Oracle,
}

impl Policy {
    /// Every policy, in the order comparisons list them.
    pub const ALL: [Policy; 7] = [
        Policy::SinglePool,
        Policy::MultiPool,
        Policy::ScaleInst,
        Policy::ScaleShard,
        Policy::ScaleFreq,
        Policy::DynamoLlm,
        Policy::Oracle,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::SinglePool => "single-pool",
            Policy::MultiPool => "multi-pool",
            Policy::ScaleInst => "scale-inst",
            Policy::ScaleShard => "scale-shard",
            Policy::ScaleFreq => "scale-freq",
            Policy::DynamoLlm => "dynamollm",
            Policy::Oracle => "oracle",
        }
    }

    /// The controller loops a controlled policy runs (`None` for the static baselines).
    pub fn loops(self) -> Option<crate::control::Loops> {
        use crate::control::Loops;
        match self {
            Policy::SinglePool | Policy::MultiPool => None,
            Policy::ScaleInst => Some(Loops { scale: true, shard: false, clock: false, pools: false }),
            Policy::ScaleShard => Some(Loops { scale: false, shard: true, clock: false, pools: true }),
            Policy::ScaleFreq => Some(Loops { scale: false, shard: false, clock: true, pools: false }),
            Policy::DynamoLlm | Policy::Oracle => Some(Loops { scale: true, shard: true, clock: true, pools: true }),
        }
    }

    /// Parse a name; an unknown one lists the valid ones.
    pub fn parse(s: &str) -> Result<Policy, String> {
        Policy::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            format!(
                "unknown policy `{s}`; valid policies: {}",
                Policy::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Number of pools the policy runs.
    pub fn pool_count(self) -> usize {
        match self {
            Policy::MultiPool => CLASS_COUNT,
            _ => 1,
        }
    }

    /// The pool serving a class.
    pub fn pool_of(self, class: RequestClass) -> usize {
        match self {
            Policy::MultiPool => class.index(),
            _ => 0,
        }
    }
}
