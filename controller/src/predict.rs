//! Output-length prediction: what a router knows of a request at admission
//! is its prompt length (and `max_tokens`, when the client sends one). The
//! predictor learns, from completed requests, how output lengths fall per
//! prompt-length bucket, and predicts the most frequent output band, cut to
//! the band of `max_tokens` when the client sends one (the engine stops there)
//! and raised to the band of a lower bound the client guarantees (vLLM's
//! `min_tokens`, or `max_tokens` with `ignore_eos`: the engine goes on that far).

use telemetry_core::{ClassBoundaries, LengthBand, RequestClass};

/// Prompt-length buckets (upper bounds, tokens); finer than the class bands.
const INPUT_BUCKETS: [u32; 12] = [32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, u32::MAX];

/// An online predictor of a request's output band.
#[derive(Debug, Clone)]
pub struct OutputPredictor {
    boundaries: ClassBoundaries,
    counts: [[u64; 3]; INPUT_BUCKETS.len()],
}

fn band_index(b: LengthBand) -> usize {
    LengthBand::ALL.iter().position(|&x| x == b).expect("a band")
}

impl OutputPredictor {
    /// An empty predictor (it predicts the short band until it has learnt).
    pub fn new(boundaries: ClassBoundaries) -> OutputPredictor {
        OutputPredictor { boundaries, counts: [[0; 3]; INPUT_BUCKETS.len()] }
    }

    fn bucket(input_tokens: u32) -> usize {
        INPUT_BUCKETS.iter().position(|&b| input_tokens <= b).unwrap_or(INPUT_BUCKETS.len() - 1)
    }

    fn output_band(&self, output_tokens: u32) -> LengthBand {
        self.boundaries.classify(1, output_tokens.max(1)).output
    }

    /// The predicted class of a request at admission.
    pub fn predict(&self, input_tokens: u32, max_tokens: Option<u32>) -> RequestClass {
        self.predict_within(input_tokens, None, max_tokens)
    }

    /// The predicted class of a request whose output is at least `min_tokens`
    /// (when the client guarantees it) and at most `max_tokens`.
    pub fn predict_within(&self, input_tokens: u32, min_tokens: Option<u32>, max_tokens: Option<u32>) -> RequestClass {
        let c = &self.counts[Self::bucket(input_tokens)];
        let learnt = (0..3).max_by_key(|&b| (c[b], std::cmp::Reverse(b))).unwrap_or(0);
        // The engine goes on to min_tokens: the output reaches its band at least.
        let best = match min_tokens {
            Some(m) if m > 0 => learnt.max(band_index(self.output_band(m))),
            _ => learnt,
        };
        // The engine stops at max_tokens: the output is cut to its band at most.
        let best = match max_tokens {
            Some(m) => best.min(band_index(self.output_band(m))),
            None => best,
        };
        let input = self.boundaries.classify(input_tokens, 1).input;
        RequestClass { input, output: LengthBand::ALL[best] }
    }

    /// Learn from a completed request.
    pub fn learn(&mut self, input_tokens: u32, output_tokens: u32) {
        let b = band_index(self.output_band(output_tokens));
        self.counts[Self::bucket(input_tokens)][b] += 1;
    }
}

/// Accuracy of predicting each request before learning from it (the online setting).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PredictorAccuracy {
    /// Requests predicted.
    pub requests: u64,
    /// Share whose output band was right.
    pub accuracy: f64,
    /// Share right when the predictor knew nothing more than the most common band overall.
    pub baseline_accuracy: f64,
}

/// Predict-then-learn over a stream of (prompt, output) lengths.
pub fn online_accuracy(pairs: impl IntoIterator<Item = (u32, u32)>) -> PredictorAccuracy {
    let b = ClassBoundaries::default();
    let mut p = OutputPredictor::new(b);
    let mut overall = [0u64; 3];
    let (mut n, mut right, mut base_right) = (0u64, 0u64, 0u64);
    for (i, o) in pairs {
        let truth = b.classify(i, o.max(1));
        if p.predict(i, None) == truth {
            right += 1;
        }
        let common = (0..3).max_by_key(|&k| (overall[k], std::cmp::Reverse(k))).unwrap_or(0);
        if LengthBand::ALL[common] == truth.output {
            base_right += 1;
        }
        overall[band_index(truth.output)] += 1;
        p.learn(i, o);
        n += 1;
    }
    let d = n.max(1) as f64;
    PredictorAccuracy { requests: n, accuracy: right as f64 / d, baseline_accuracy: base_right as f64 / d }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_learns_the_band_that_follows_a_prompt_length() {
        // Short prompts get long answers, long prompts short ones.
        let pairs = (0..2000u32).map(|k| if k % 2 == 0 { (100, 500) } else { (3000, 20) });
        let a = online_accuracy(pairs);
        assert!(a.accuracy > 0.99, "{a:?}");
        assert!(a.baseline_accuracy < 0.6, "{a:?}");
    }

    #[test]
    fn max_tokens_caps_the_predicted_band() {
        let mut p = OutputPredictor::new(ClassBoundaries::default());
        for _ in 0..10 {
            p.learn(100, 800);
        }
        assert_eq!(p.predict(100, None).output, LengthBand::Long);
        assert_eq!(p.predict(100, Some(50)).output, LengthBand::Short);
        assert_eq!(p.predict(100, Some(200)).output, LengthBand::Medium);
        // A guaranteed lower bound lifts a prediction the history keeps short.
        let mut q = OutputPredictor::new(ClassBoundaries::default());
        for _ in 0..10 {
            q.learn(100, 20);
        }
        assert_eq!(q.predict(100, Some(400)).output, LengthBand::Short);
        assert_eq!(q.predict_within(100, Some(400), Some(400)).output, LengthBand::Long);
        assert_eq!(q.predict_within(100, Some(200), None).output, LengthBand::Medium);
    }
}
