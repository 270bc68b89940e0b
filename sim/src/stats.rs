//! Run statistics: per-class latency histograms (HDR, not sample vectors) and
//! exact SLO attainment counts, plus the cluster's energy and GPU holding.

use hdrhistogram::Histogram;
use serde::Serialize;
use telemetry_core::CLASS_COUNT;

/// Latency values are recorded in microseconds, 3 significant digits, up to 1 hour.
const HIST_MAX_US: u64 = 3_600_000_000;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

fn to_us(s: f64) -> u64 {
    ((s * 1e6).round() as u64).clamp(1, HIST_MAX_US)
}

pub use telemetry_core::{ClassSlo, P99_ATTAINMENT};

/// Why the twin turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Its class is routed to no pool.
    NoPool,
    /// Its pool has no serving instance (all starting, draining or none).
    NoServingInstance,
    /// Its prompt and output do not fit any serving instance's KV cache.
    TooLarge,
    /// Its pool has no serving instance because the site power budget has no room for one
    /// (the controller says so: see `Cluster::set_power_held`).
    PowerBudget,
}

impl RejectReason {
    /// Every reason, in the order of [`ClassStats::rejected_by`].
    pub const ALL: [RejectReason; 4] =
        [RejectReason::NoPool, RejectReason::NoServingInstance, RejectReason::TooLarge, RejectReason::PowerBudget];

    /// The reason in words, as the table and logs print it.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NoPool => "no-pool",
            RejectReason::NoServingInstance => "no-serving-instance",
            RejectReason::TooLarge => "too-large",
            RejectReason::PowerBudget => "power-budget",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Length of the windows [`ClassStats::worst_hour_attainment`] looks at (s).
pub const HOUR_S: f64 = 3600.0;
/// A clock hour counts for [`ClassStats::worst_hour_attainment`] once it holds at least this
/// many of the class's requests (TTFTs and rejections): below that one miss moves it by over 1%.
pub const MIN_HOUR_REQUESTS: u64 = 100;

/// Attainment counts of one class within one clock hour of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HourCounts {
    /// Requests whose TTFT met the SLO.
    pub ttft_ok: u64,
    /// Requests with a TTFT recorded, plus those turned away.
    pub ttft_n: u64,
    /// Token gaps that met the SLO.
    pub gaps_ok: u64,
    /// Token gaps recorded.
    pub gaps_n: u64,
}

impl HourCounts {
    /// The smaller of the hour's TTFT and TBT attainments (1 where it has none).
    pub fn attainment(&self) -> f64 {
        let share = |ok: u64, n: u64| if n == 0 { 1.0 } else { ok as f64 / n as f64 };
        share(self.ttft_ok, self.ttft_n).min(share(self.gaps_ok, self.gaps_n))
    }
}

/// Everything measured for one class.
#[derive(Debug, Clone)]
pub struct ClassStats {
    /// Requests that arrived.
    pub requests: u64,
    /// Requests turned away (no serving instance, or too large for any KV cache).
    pub rejected: u64,
    /// Requests turned away, by reason (indexed as [`RejectReason::ALL`]).
    pub rejected_by: [u64; 4],
    /// Requests that finished.
    pub completed: u64,
    /// TTFT histogram (µs).
    pub ttft: Histogram<u64>,
    /// Token-gap histogram (µs).
    pub tbt: Histogram<u64>,
    /// Requests whose TTFT met the SLO.
    pub ttft_ok: u64,
    /// Requests with a TTFT recorded.
    pub ttft_n: u64,
    /// Token gaps that met the SLO.
    pub gaps_ok: u64,
    /// Token gaps recorded.
    pub gaps_n: u64,
    /// The same counts per clock hour of the run (index: hours since it began), by when they were
    /// recorded (a TTFT at its first token, a gap at the end of its step, a rejection on arrival).
    pub hours: Vec<HourCounts>,
}

impl ClassStats {
    fn new() -> ClassStats {
        ClassStats {
            requests: 0,
            rejected: 0,
            rejected_by: [0; 4],
            completed: 0,
            ttft: new_hist(),
            tbt: new_hist(),
            ttft_ok: 0,
            ttft_n: 0,
            gaps_ok: 0,
            gaps_n: 0,
            hours: Vec::new(),
        }
    }

    fn hour(&mut self, at_s: f64) -> &mut HourCounts {
        let h = (at_s.max(0.0) / HOUR_S) as usize;
        if self.hours.len() <= h {
            self.hours.resize(h + 1, HourCounts::default());
        }
        &mut self.hours[h]
    }

    /// The lowest SLO attainment (the smaller of TTFT and TBT) of any clock hour holding at least
    /// [`MIN_HOUR_REQUESTS`] of the class's requests; `None` when no hour does. A P99 SLO held over
    /// a week can hide a daily peak hour that misses it.
    pub fn worst_hour_attainment(&self) -> Option<f64> {
        self.hours.iter().filter(|h| h.ttft_n >= MIN_HOUR_REQUESTS).map(HourCounts::attainment).reduce(f64::min)
    }

    /// The clock hours holding at least [`MIN_HOUR_REQUESTS`] of the class's requests whose SLO
    /// attainment fell below [`P99_ATTAINMENT`].
    pub fn hours_below_p99(&self) -> u32 {
        self.hours.iter().filter(|h| h.ttft_n >= MIN_HOUR_REQUESTS && h.attainment() < P99_ATTAINMENT).count() as u32
    }

    /// Requests turned away for this reason.
    pub fn rejected_for(&self, why: RejectReason) -> u64 {
        self.rejected_by[why.index()]
    }

    /// Share of requests meeting TTFT (rejected requests count as misses); 1 with no requests.
    pub fn ttft_attainment(&self) -> f64 {
        let n = self.ttft_n + self.rejected;
        if n == 0 {
            1.0
        } else {
            self.ttft_ok as f64 / n as f64
        }
    }

    /// Share of token gaps meeting TBT; 1 with no gaps.
    pub fn tbt_attainment(&self) -> f64 {
        if self.gaps_n == 0 {
            1.0
        } else {
            self.gaps_ok as f64 / self.gaps_n as f64
        }
    }

    /// The smaller of the two attainments.
    pub fn slo_attainment(&self) -> f64 {
        self.ttft_attainment().min(self.tbt_attainment())
    }
}

/// Statistics of a whole run.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Per class, indexed by [`RequestClass::index`].
    pub classes: Vec<ClassStats>,
    /// The SLOs the attainments are measured against.
    pub slo: [ClassSlo; CLASS_COUNT],
}

impl Stats {
    /// Empty statistics measured against these SLOs.
    pub fn new(slo: [ClassSlo; CLASS_COUNT]) -> Stats {
        Stats { classes: (0..CLASS_COUNT).map(|_| ClassStats::new()).collect(), slo }
    }

    /// Per clock hour of the run, the lowest SLO attainment of the classes holding at least
    /// [`MIN_HOUR_REQUESTS`] requests that hour (`None` where none does).
    pub fn worst_class_by_hour(&self) -> Vec<Option<f64>> {
        let hours = self.classes.iter().map(|c| c.hours.len()).max().unwrap_or(0);
        (0..hours)
            .map(|h| {
                self.classes
                    .iter()
                    .filter_map(|c| c.hours.get(h).filter(|x| x.ttft_n >= MIN_HOUR_REQUESTS))
                    .map(HourCounts::attainment)
                    .reduce(f64::min)
            })
            .collect()
    }

    /// A request arrived.
    #[inline]
    pub fn arrived(&mut self, class: usize) {
        self.classes[class].requests += 1;
    }

    /// A request was turned away, and why.
    #[inline]
    pub fn rejected(&mut self, class: usize, why: RejectReason, at_s: f64) {
        let c = &mut self.classes[class];
        c.rejected += 1;
        c.rejected_by[why.index()] += 1;
        c.hour(at_s).ttft_n += 1;
    }

    /// A request finished.
    #[inline]
    pub fn completed(&mut self, class: usize) {
        self.classes[class].completed += 1;
    }

    /// Record a request's TTFT, its first token out at `at_s`.
    #[inline]
    pub fn ttft(&mut self, class: usize, ttft_s: f64, at_s: f64) {
        let slo = self.slo[class].ttft_s;
        let c = &mut self.classes[class];
        let ok = u64::from(ttft_s <= slo);
        c.ttft_n += 1;
        c.ttft_ok += ok;
        let h = c.hour(at_s);
        h.ttft_n += 1;
        h.ttft_ok += ok;
        c.ttft.saturating_record(to_us(ttft_s));
    }

    /// Record `count` sequences' gaps over `steps` consecutive steps whose
    /// durations are `first_s`, `first_s + growth_s`, … (an arithmetic series), ending at `at_s`.
    pub fn gaps(&mut self, class: usize, count: u64, steps: u64, first_s: f64, growth_s: f64, at_s: f64) {
        if count == 0 || steps == 0 {
            return;
        }
        let slo = self.slo[class].tbt_s;
        let c = &mut self.classes[class];
        // Exact count of the steps within the SLO.
        let ok_steps = if first_s > slo {
            0
        } else if growth_s <= 0.0 {
            steps
        } else {
            ((((slo - first_s) / growth_s).floor().min(steps as f64) as u64) + 1).min(steps)
        };
        c.gaps_n += count * steps;
        c.gaps_ok += count * ok_steps;
        let h = c.hour(at_s);
        h.gaps_n += count * steps;
        h.gaps_ok += count * ok_steps;
        // The histogram gets the series in at most four equal segments.
        let segments = steps.min(4);
        let base = steps / segments;
        let mut start = 0;
        for k in 0..segments {
            let len = base + u64::from(k < steps % segments);
            let mid = start as f64 + (len as f64 - 1.0) / 2.0;
            let _ = c.tbt.record_n(to_us(first_s + growth_s * mid), count * len);
            start += len;
        }
    }
}

/// Latency and attainment figures of a set of requests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median TTFT.
    pub ttft_p50_s: f64,
    /// P99 TTFT.
    pub ttft_p99_s: f64,
    /// Median token gap.
    pub tbt_p50_s: f64,
    /// P99 token gap.
    pub tbt_p99_s: f64,
    /// Share of requests meeting TTFT.
    pub ttft_attainment: f64,
    /// Share of gaps meeting TBT.
    pub tbt_attainment: f64,
    /// The smaller of the two.
    pub slo_attainment: f64,
    /// The lowest SLO attainment of a clock hour holding at least [`MIN_HOUR_REQUESTS`] requests
    /// of a class (over all classes: the lowest of the classes'); `None` when no hour does. Printed
    /// in the tables; not in the JSON, whose fields are a fixed contract.
    #[serde(skip)]
    pub worst_hour_attainment: Option<f64>,
    /// Clock hours (of a class, holding at least [`MIN_HOUR_REQUESTS`] of its requests) below
    /// [`P99_ATTAINMENT`]; over all classes, the sum of the classes'. Tables only, as above.
    #[serde(skip)]
    pub hours_below_p99: u32,
}

fn q(h: &Histogram<u64>, p: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(p) as f64 * 1e-6
    }
}

impl LatencySummary {
    /// Summary of one class.
    pub fn of_class(c: &ClassStats) -> LatencySummary {
        LatencySummary {
            ttft_p50_s: q(&c.ttft, 0.5),
            ttft_p99_s: q(&c.ttft, 0.99),
            tbt_p50_s: q(&c.tbt, 0.5),
            tbt_p99_s: q(&c.tbt, 0.99),
            ttft_attainment: c.ttft_attainment(),
            tbt_attainment: c.tbt_attainment(),
            slo_attainment: c.slo_attainment(),
            worst_hour_attainment: c.worst_hour_attainment(),
            hours_below_p99: c.hours_below_p99(),
        }
    }

    /// Summary over all classes together.
    pub fn of_all(classes: &[ClassStats]) -> LatencySummary {
        let mut ttft = new_hist();
        let mut tbt = new_hist();
        let (mut t_ok, mut t_n, mut g_ok, mut g_n) = (0u64, 0u64, 0u64, 0u64);
        for c in classes {
            ttft.add(&c.ttft).expect("same bounds");
            tbt.add(&c.tbt).expect("same bounds");
            t_ok += c.ttft_ok;
            t_n += c.ttft_n + c.rejected;
            g_ok += c.gaps_ok;
            g_n += c.gaps_n;
        }
        let ttft_attainment = if t_n == 0 { 1.0 } else { t_ok as f64 / t_n as f64 };
        let tbt_attainment = if g_n == 0 { 1.0 } else { g_ok as f64 / g_n as f64 };
        LatencySummary {
            ttft_p50_s: q(&ttft, 0.5),
            ttft_p99_s: q(&ttft, 0.99),
            tbt_p50_s: q(&tbt, 0.5),
            tbt_p99_s: q(&tbt, 0.99),
            ttft_attainment,
            tbt_attainment,
            slo_attainment: ttft_attainment.min(tbt_attainment),
            worst_hour_attainment: classes.iter().filter_map(ClassStats::worst_hour_attainment).reduce(f64::min),
            hours_below_p99: classes.iter().map(ClassStats::hours_below_p99).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo(ttft_s: f64, tbt_s: f64) -> [ClassSlo; CLASS_COUNT] {
        [ClassSlo { ttft_s, tbt_s }; CLASS_COUNT]
    }

    #[test]
    fn gap_attainment_counts_an_arithmetic_series_exactly() {
        let mut s = Stats::new(slo(1.0, 0.050));
        // Steps of 40, 42, …, 58 ms: 40..=50 meet the SLO → 6 of 10 steps.
        s.gaps(0, 3, 10, 0.040, 0.002, 0.5);
        assert_eq!(s.classes[0].gaps_n, 30);
        assert_eq!(s.classes[0].gaps_ok, 18);
        assert!((s.classes[0].tbt_attainment() - 0.6).abs() < 1e-12);
        let p50 = LatencySummary::of_class(&s.classes[0]).tbt_p50_s;
        assert!((0.045..0.055).contains(&p50), "{p50}");
    }

    #[test]
    fn the_worst_hour_is_the_lowest_hour_with_enough_requests() {
        let mut s = Stats::new(slo(0.1, 0.05));
        // Hour 0: 200 requests, 4 miss TTFT (98%). Hour 1: 150 requests, none misses, but a tenth
        // of the gaps miss (90%). Hour 2: 99 requests, half miss: too few to count.
        for k in 0..200 {
            s.ttft(0, if k < 4 { 0.2 } else { 0.05 }, 10.0 + f64::from(k));
        }
        for k in 0..150 {
            s.ttft(0, 0.05, HOUR_S + f64::from(k));
        }
        s.gaps(0, 1, 9, 0.01, 0.0, HOUR_S + 200.0);
        s.gaps(0, 1, 1, 0.06, 0.0, HOUR_S + 201.0);
        for k in 0..99 {
            s.ttft(0, if k % 2 == 0 { 0.2 } else { 0.05 }, 2.0 * HOUR_S + f64::from(k));
        }
        let c = &s.classes[0];
        assert_eq!(c.hours.len(), 3);
        assert!((c.hours[0].attainment() - 0.98).abs() < 1e-12);
        assert!((c.hours[1].attainment() - 0.9).abs() < 1e-12);
        assert!((c.worst_hour_attainment().unwrap() - 0.9).abs() < 1e-12, "hour 2 has too few requests");
        assert_eq!(c.hours_below_p99(), 2, "hours 0 (98%) and 1 (90%); hour 2 has too few requests");
        // A rejection counts against its hour's TTFT attainment.
        for k in 0..20 {
            s.rejected(0, RejectReason::NoServingInstance, 5.0 + f64::from(k));
        }
        assert!((s.classes[0].hours[0].attainment() - 196.0 / 220.0).abs() < 1e-12);
        assert!((s.classes[0].worst_hour_attainment().unwrap() - 196.0 / 220.0).abs() < 1e-12);
        // Over all classes: the lowest class's worst hour; a class with no full hour has none.
        assert_eq!(s.classes[1].worst_hour_attainment(), None);
        let all = LatencySummary::of_all(&s.classes);
        assert_eq!(all.worst_hour_attainment, s.classes[0].worst_hour_attainment());
        // Hour by hour, the lowest class with enough requests: class 1's full hour 1 is lower.
        for k in 0..100 {
            s.ttft(1, if k < 20 { 0.2 } else { 0.05 }, HOUR_S + f64::from(k));
        }
        let by_hour = s.worst_class_by_hour();
        assert_eq!(by_hour.len(), 3);
        assert!((by_hour[0].unwrap() - 196.0 / 220.0).abs() < 1e-12);
        assert!((by_hour[1].unwrap() - 0.8).abs() < 1e-12);
        assert_eq!(by_hour[2], None, "no class has 100 requests in hour 2");
        // Hours below 99%: class 0's two, and class 1's hour 1 (80%); over all classes, their sum.
        assert_eq!(s.classes[1].hours_below_p99(), 1);
        assert_eq!(LatencySummary::of_all(&s.classes).hours_below_p99, 3);
    }

    #[test]
    fn rejected_requests_count_against_ttft_attainment() {
        let mut s = Stats::new(slo(0.1, 1.0));
        s.ttft(2, 0.05, 1.0);
        s.ttft(2, 0.20, 2.0);
        s.rejected(2, RejectReason::NoServingInstance, 3.0);
        s.ttft(2, 0.01, 4.0);
        assert!((s.classes[2].ttft_attainment() - 0.5).abs() < 1e-12);
        assert_eq!(s.classes[0].slo_attainment(), 1.0);
    }
}
