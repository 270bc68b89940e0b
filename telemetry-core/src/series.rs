//! Per-class per-minute load series from a request stream: the shape the
//! forecaster takes. Uses the same [`ClassBoundaries`] as the twin's
//! classifier, so a forecast for `SS` means the same requests the twin routes
//! as `SS`.

use crate::class::{ClassBoundaries, RequestClass, CLASS_COUNT};
use crate::trace::{Request, TraceError};

/// Requests and tokens per step for each class, plus the total.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassSeries {
    /// Step between points, in seconds (60 for per-minute series).
    pub step_s: f64,
    /// Requests per step, indexed by [`RequestClass::index`].
    pub requests: [Vec<f64>; CLASS_COUNT],
    /// Prompt + output tokens per step, indexed by class.
    pub tokens: [Vec<f64>; CLASS_COUNT],
}

impl ClassSeries {
    /// Total requests per step over all classes.
    pub fn total_requests(&self) -> Vec<f64> {
        let n = self.len();
        (0..n).map(|i| self.requests.iter().map(|s| s[i]).sum()).collect()
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.requests[0].len()
    }

    /// True when there are no steps.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests per step of one class.
    pub fn class_requests(&self, class: RequestClass) -> &[f64] {
        &self.requests[class.index()]
    }
}

/// Bin a time-ordered request stream into per-class series with `step_s`
/// steps. `span_s`, when given, fixes the number of steps (trailing empty
/// steps count as zeros); otherwise the series ends at the last request.
pub fn class_series<I>(
    requests: I,
    boundaries: &ClassBoundaries,
    step_s: f64,
    span_s: Option<f64>,
) -> Result<ClassSeries, TraceError>
where
    I: IntoIterator<Item = Result<Request, TraceError>>,
{
    let mut out = ClassSeries {
        step_s,
        requests: std::array::from_fn(|_| Vec::new()),
        tokens: std::array::from_fn(|_| Vec::new()),
    };
    let grow = |out: &mut ClassSeries, n: usize| {
        for c in 0..CLASS_COUNT {
            if out.requests[c].len() < n {
                out.requests[c].resize(n, 0.0);
                out.tokens[c].resize(n, 0.0);
            }
        }
    };
    for r in requests {
        let r = r?;
        if let Some(span) = span_s {
            if r.arrival_s >= span {
                break;
            }
        }
        let bin = (r.arrival_s / step_s).floor().max(0.0) as usize;
        grow(&mut out, bin + 1);
        let c = boundaries.classify(r.input_tokens, r.output_tokens).index();
        out.requests[c][bin] += 1.0;
        out.tokens[c][bin] += f64::from(r.input_tokens) + f64::from(r.output_tokens);
    }
    if let Some(span) = span_s {
        grow(&mut out, (span / step_s).ceil() as usize);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_class_and_minute() {
        let reqs = vec![
            Ok(Request { arrival_s: 1.0, input_tokens: 10, output_tokens: 10 }),
            Ok(Request { arrival_s: 59.9, input_tokens: 2000, output_tokens: 500 }),
            Ok(Request { arrival_s: 61.0, input_tokens: 10, output_tokens: 10 }),
        ];
        let s = class_series(reqs, &ClassBoundaries::default(), 60.0, Some(180.0)).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.class_requests(RequestClass::parse("SS").unwrap()), &[1.0, 1.0, 0.0]);
        assert_eq!(s.class_requests(RequestClass::parse("LL").unwrap()), &[1.0, 0.0, 0.0]);
        assert_eq!(s.tokens[RequestClass::parse("LL").unwrap().index()][0], 2500.0);
        assert_eq!(s.total_requests(), vec![2.0, 1.0, 0.0]);
    }
}
