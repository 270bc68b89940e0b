//! The profiler (`dynamollm profile`): sweeps class × TP × clock × load on a
//! target (the twin in virtual time, or a real OpenAI-compatible engine over
//! HTTP with NVML) into the profile table the controller plans from
//! (`controller::profile`, re-exported here), and `twin accuracy`.

pub mod accuracy;
pub mod http_target;
pub mod sweep;
pub mod twin_target;

pub use controller::profile::{
    table, Estimate, ProfileError, ProfileIssue, ProfileRow, ProfileTable, Severity, Unloaded,
};
pub use sweep::{Point, SweepSpec, Target};

use sim::measure::{class_medians, representative};
use telemetry::{ClassBoundaries, LengthSamples, RequestClass, CLASS_COUNT};

/// A workload's request lengths split by class, as the profiler sends them.
#[derive(Debug, Clone)]
pub struct ClassLengths {
    /// Each class's (prompt, output) pairs (a class the workload lacks gets its median stand-in).
    pub by_class: [LengthSamples; CLASS_COUNT],
    /// Each class's median request (the SLO base).
    pub medians: [(u32, u32); CLASS_COUNT],
}

impl ClassLengths {
    /// Split `lengths` by class; a class it lacks uses the middle of its length bands.
    pub fn split(lengths: &LengthSamples) -> ClassLengths {
        let boundaries = ClassBoundaries::default();
        let medians_opt = class_medians(lengths.pairs(), &boundaries);
        let medians: [(u32, u32); CLASS_COUNT] = std::array::from_fn(|c| {
            medians_opt[c].unwrap_or_else(|| representative(RequestClass::from_index(c), &boundaries))
        });
        let by_class = std::array::from_fn(|c| {
            let class = RequestClass::from_index(c);
            let mut pairs: Vec<(u32, u32)> = lengths
                .pairs()
                .iter()
                .map(|&(i, o)| (i, o.max(1)))
                .filter(|&(i, o)| boundaries.classify(i, o) == class)
                .collect();
            if pairs.is_empty() {
                pairs.push(medians[c]);
            }
            LengthSamples::from_pairs(format!("{} ({class})", lengths.source.display()), pairs)
        });
        ClassLengths { by_class, medians }
    }

    /// The samples of one class.
    pub fn of(&self, class: RequestClass) -> &LengthSamples {
        &self.by_class[class.index()]
    }

    /// Mean prompt + output tokens of a class's requests.
    pub fn mean_tokens(&self, class: RequestClass) -> f64 {
        sim::measure::mean_tokens(self.of(class))
    }
}
