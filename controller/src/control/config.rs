//! The controller's settings ([`ControllerConfig`], which loops run and how
//! often, what they aim at) and the defaults and ranges of its tunable ones.

use serde::Serialize;

/// Which loops run, and how the controller sees the future.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Loops {
    /// Change instance counts.
    pub scale: bool,
    /// Change TP degrees (else every instance is TP8).
    pub shard: bool,
    /// Change clocks (else every instance runs at the top clock).
    pub clock: bool,
    /// One pool per class (else a single pool for all).
    pub pools: bool,
}

/// Controller settings.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerConfig {
    /// Loops that run.
    pub loops: Loops,
    /// Scale loop period (s).
    pub scale_period_s: f64,
    /// Shard loop period (s).
    pub shard_period_s: f64,
    /// Clock loop period (s).
    pub clock_period_s: f64,
    /// Time from spawn to serving assumed when planning ahead (s); updated from observation.
    pub spawn_lead_s: f64,
    /// Spawn from warm standby (else cold).
    pub warm_spawn: bool,
    /// Plan instances to at most this share of their SLO capacity.
    pub max_util: f64,
    /// Extra margin on the observed load when it exceeds the forecast.
    pub observed_margin: f64,
    /// The clock loop's margin on the load of a pool serving one prompt band
    /// starts at 1 and is learnt from attainment: a dip in a pool running
    /// below the top clock multiplies it by this step (up to
    /// `observed_margin`) before the pool's capacity shrinks (which costs
    /// GPUs), unless the dip is sharp (`sharp_dip_attainment`); a
    /// comfortable window multiplies it by `clock_margin_decay` (down to
    /// `clock_margin_floor`) as the capacity grows.
    pub clock_margin_step: f64,
    /// See `clock_margin_step`.
    pub clock_margin_decay: f64,
    /// The lowest the learnt clock margin goes (≤ 1). Below 1 the clock loop
    /// takes the load as lighter than it is: a pool of instances behind the
    /// router queues less than the one instance a profile row measured, and
    /// more so at low clocks, so a pool that keeps its SLOs with room to
    /// spare runs lower clocks than the profile alone allows.
    pub clock_margin_floor: f64,
    /// A pool whose attainment is below target and where some class's
    /// attainment over the plain window (the last `attainment_window_s`) is
    /// below this shrinks its capacity at once (the clock margin rises too),
    /// rather than raising clocks first: a sharp dip says the pool is short of
    /// instances now, and a margin climbing a step a window would leave it
    /// short for half an hour.
    pub sharp_dip_attainment: f64,
    /// A pool whose every class holds at least this share of its requests
    /// within SLO over the attainment window (above the 99% target) is
    /// comfortable: its learnt capacity grows a step and its clock margin
    /// decays a step. Between the target and this it holds still. Lower
    /// takes a pool nearer the 99% line: less energy, less room to spare.
    pub attainment_comfort: f64,
    /// A pool is re-planned between shard periods (with the scale loop on)
    /// when the load seen now (smoothed, times `observed_margin`) passes this
    /// multiple of the demand it was planned for.
    pub rise_replan: f64,
    /// An instance is not retired as surplus (by the scale or shard loop, or
    /// when its pool merges away) before it has been seen up this long (s),
    /// counted from the first step that observes it; 0: no minimum. It damps
    /// the spawn/retire churn of a pool whose target hovers between two sizes,
    /// for operators whose spawns can fail or cost more than the twin's, at an
    /// energy cost. A full fixed cluster freeing GPUs for its new mix is not
    /// held by it.
    pub retire_min_age_s: f64,
    /// TP degrees the shard loop may use.
    pub tps: Vec<u32>,
    /// The top clock.
    pub max_clock_mhz: u32,
    /// Most GPUs the cluster may hold.
    pub gpu_budget: u32,
    /// A site power budget (W) the fleet may never exceed: what every
    /// instance may draw at its clock (the most power per GPU the profile
    /// shows there), idle and starting instances included, stays under it
    /// less `power_headroom`. `None`: no budget.
    pub power_budget_w: Option<f64>,
    /// Hours of the day with a budget of their own (the first period holding the hour wins;
    /// other hours have `power_budget_w`, or no budget where that is `None`).
    pub power_budget_periods: Vec<BudgetPeriod>,
    /// What to add to the controller's time (s) for the time of day the periods count in:
    /// 0 where hour 0 is the controller's start.
    pub budget_day_offset_s: f64,
    /// The share of the power budget kept free (0 to below 1).
    pub power_headroom: f64,
    /// Each class's rank under the power budget (0 first): when the budget
    /// cannot carry the load, the pools of the lowest-ranked classes have
    /// their clocks lowered first and lose instances to higher-ranked pools;
    /// once a higher-ranked class has missed three quarters of its hour's P99
    /// budget, the lowest-ranked classes are shed (turned away) one by one.
    pub class_priority: [u8; telemetry_core::CLASS_COUNT],
    /// What the plan minimises: energy alone (the default), or energy and the GPUs held
    /// weighed by prices hour by hour (see [`super::Objective`]).
    pub objective: super::Objective,
    /// Clock changes need this relative power gain (unless the SLO forces them).
    pub clock_hysteresis: f64,
    /// Hold a new clock at least this long (s) unless the SLO forces a change.
    pub clock_hold_s: f64,
    /// A step down to a lower clock must also carry the pool's smoothed
    /// arrival rate plus this many Poisson standard deviations of one clock
    /// period's count (√(rate / period)): the chance bursts of a steady load
    /// that would otherwise take the clock back up a period later. Rises are
    /// not held back (any period above the smoothed rate counts). 0: a step
    /// down needs only carry the load seen now.
    pub clock_down_sigmas: f64,
    /// The shard loop's transition check also keeps the fleet it has when a
    /// new mix that needs new instances saves less than this share of the
    /// pool's predicted power (0–1; 0: the spawn's cost alone decides).
    pub mix_hysteresis: f64,
    /// Waiting requests on an instance that trip the backlog guard.
    pub backlog_waiting: u32,
    /// The backlog guard hands an instance's unstarted requests to other
    /// instances (`move-queued`); needs a backend that carries it out.
    pub move_queued: bool,
    /// The shard loop grows a surplus instance to a wanted larger TP degree
    /// in place (`reshard`, path `in-place`: DynamoLLM's weight move over
    /// NVLink, no restart) instead of spawning one of that degree and
    /// retiring the surplus one; needs a backend that carries it out.
    pub reshard_in_place: bool,
    /// Without the scale and shard loops: hold exactly this many TP8 instances.
    pub fixed_instances: Option<u32>,
    /// With the shard loop but no scale loop (`scale-shard`): the cluster's
    /// GPUs (a static cluster's, sized for the peak). Every shard period
    /// shares them among the pools by what each pool's plan needs, and every
    /// pool holds its share. Without it, each pool keeps its first plan's GPUs.
    pub fixed_gpus: Option<u32>,
    /// The window SLO attainment is observed over (s); capacity is re-learnt at most once per window.
    pub attainment_window_s: f64,
    /// A class's window reaches further back (up to `attainment_lookback_s`)
    /// until it holds this many requests: a small class's attainment over
    /// one short window is a few requests' noise (at 85 requests one miss
    /// reads 98.8%), which both shrinks capacity for nothing and, read as
    /// comfort, lowers clocks on no evidence.
    pub attainment_min_requests: u64,
    /// How far back (s) a class's attainment window may reach.
    pub attainment_lookback_s: f64,
}

/// A period of the day with a power budget of its own: hours `[from_h, to_h)`, wrapping past
/// midnight where `to_h` ≤ `from_h`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BudgetPeriod {
    /// First hour (0–23).
    pub from_h: u32,
    /// The hour after the last (1–24).
    pub to_h: u32,
    /// The budget in those hours (W).
    pub power_w: f64,
}

impl BudgetPeriod {
    /// Whether hour `h` (0–23) is in the period.
    pub fn holds(&self, h: u32) -> bool {
        if self.from_h < self.to_h {
            (self.from_h..self.to_h).contains(&h)
        } else {
            h >= self.from_h || h < self.to_h
        }
    }
}

impl ControllerConfig {
    /// The power budget at controller time `now_s` (W): the period holding that hour of the
    /// day, else `power_budget_w`.
    pub fn power_budget_at(&self, now_s: f64) -> Option<f64> {
        let h = (((now_s + self.budget_day_offset_s) / 3600.0).floor().rem_euclid(24.0)) as u32;
        self.power_budget_periods.iter().find(|p| p.holds(h)).map(|p| p.power_w).or(self.power_budget_w)
    }

    /// Defaults for a set of loops.
    pub fn new(loops: Loops, max_clock_mhz: u32) -> ControllerConfig {
        ControllerConfig {
            loops,
            scale_period_s: 1800.0,
            shard_period_s: 300.0,
            clock_period_s: 5.0,
            spawn_lead_s: 30.0,
            warm_spawn: true,
            max_util: 0.7,
            observed_margin: 1.15,
            // On the week-long Coding curve (seeds 1, 2, 3) against no learnt margin: −1.4, −1.3 and
            // −1.9% energy, −5.1, −5.5 and −6.2% GPU-hours, every class ≥ 99.2%. A decay of 0.98 cost
            // +0.15% energy; 0.95 and 0.90 did about as well as 0.93; a step of 1.1 or a ceiling of 1.3
            // no better.
            clock_margin_step: 1.05,
            clock_margin_decay: 0.93,
            // With `attainment_min_requests` 600 and the stale-dip rule (`class_attainment_window`), on
            // the week-long Coding curve (seeds 1, 2, 3): 0.85 takes 3,942.0, 3,964.4 and 3,961.2 kWh
            // against 4,128.6, 4,122.7 and 4,124.9 with the margin held at 1 and 300 s windows for every
            // class (−4.5%, −3.8%, −4.0%), every class ≥ 99.10% (MM, the smallest class of a big pool,
            // is the worst). 0.8 went lower (3,929.2, 3,906.5, 3,947.8 kWh; MM 99.05%) but missed MM's
            // P99 TTFT under `--balance prompt-tokens` (98.99%; 0.85: 99.11%); 0.7 made the oracle miss
            // SS's P99 TBT on the Conversation hour at --scale 8. On that hour (×2, 2.25, 8, 16) 0.85
            // takes dynamollm from 0.553, 0.539, 0.504, 0.535 to 0.542, 0.533, 0.492, 0.519 of
            // single-pool, every class of dynamollm and the oracle holding.
            clock_margin_floor: 0.85,
            // On the week-long Coding curve (seeds 1, 2, 3) against none: 3,938.0, 3,942.9 and 3,974.5
            // kWh against 3,942.0, 3,964.4 and 3,961.2, the worst class 99.53, 99.52 and 99.51% against
            // 99.17, 99.10 and 99.10% (MM), and MM's worst clock hour 98.0% against 94.7% (seed 1).
            // 0.97 cost 0.7% more; 0.985 and 0.99 0.3% and 0.6% more for a few fewer hours below 99%.
            sharp_dip_attainment: 0.98,
            // On the week-long Coding curve (seeds 1, 2, 3): 0.996 takes 3,888.8, 3,892.4 and 3,906.0 kWh
            // against 3,938.0, 3,942.9 and 3,974.5 at 0.998, the worst class 99.37–99.38% against
            // 99.51–99.53%. 0.995 and 0.994 went lower (3,850.3 and 3,811.2 kWh, seed 1; worst class
            // 99.30% and 99.26%) but made the oracle miss SS's P99 TBT on the Conversation hour at --scale 8
            // (98.72%); 0.996 holds it there (99.28%).
            attainment_comfort: ATTAINMENT_COMFORT,
            // With the shorter fallback window (closed_loop), every value from 1.0 to 1.25 takes the
            // Conversation hour's energy down 1–6% (×2 to ×16); on the week-long Coding curve 1.05 and
            // 1.1 save 0.2%, 1.0, 1.15 and 1.25 cost 0.1–0.2% (more spawns).
            rise_replan: 1.1,
            retire_min_age_s: 0.0,
            tps: if loops.shard { vec![2, 4, 8] } else { vec![8] },
            max_clock_mhz,
            gpu_budget: u32::MAX,
            power_budget_w: None,
            power_budget_periods: Vec::new(),
            budget_day_offset_s: 0.0,
            // With BURST_SIGMAS (budget.rs) for the fleet's spread, 2% more is kept free.
            power_headroom: 0.02,
            // Short prompts first (interactive chat), long prompts (batch-like) last.
            class_priority: std::array::from_fn(|c| c as u8),
            objective: super::Objective::energy(),
            clock_hysteresis: 0.03,
            clock_hold_s: 30.0,
            // On the week-long Coding curve (seeds 1–3), 1 took the clock changes from 82,657, 88,097
            // and 87,114 to 41,246, 42,942 and 42,289 at the same energy (−0.1%, +0.2%, −0.2%) and the
            // class-hours below 99% from 93 to 84.
            clock_down_sigmas: CLOCK_DOWN_SIGMAS,
            // On the week-long Coding curve (seeds 1–3), 0.04 took the spawns from 680, 669 and 717 to
            // 525, 503 and 556 for 0.1%, 0.7% and 0.1% less energy; 0.02 kept 593 (seed 1), 0.08 485.
            mix_hysteresis: MIX_HYSTERESIS,
            backlog_waiting: 4,
            move_queued: true,
            reshard_in_place: true,
            fixed_instances: None,
            fixed_gpus: None,
            attainment_window_s: 300.0,
            // Without it a floor below 1 cost MM its P99 TTFT on the week-long Coding curve (98.91% at
            // a floor of 0.7: MM's ~85 requests a window read as comfort, or as a dip, on one
            // request); at 0.7, 300 gave 3,990.9 kWh, 600 3,923.8, 1,000 3,928.6 and 2,000 3,924.6.
            attainment_min_requests: 600,
            attainment_lookback_s: 3600.0,
        }
    }
}

/// Above this weight of a GPU (W, see `Objective`), the learnt clock margin stays at 1
/// (`Controller::margin_floor`). On the week-long Coding curve the default floor (0.85)
/// against 1 saves 91.7 kWh for 426.7 more GPU-hours (seed 1) and 75.3 kWh for 714.7 (seed 2):
/// about 215 and 105 W of GPU power per GPU held more. The cost objective weighs a GPU at
/// 12–28 kW (the floor goes to 1: its cost falls 2.5% and 6.6% at seeds 1 and 2), the carbon
/// objective at 37–113 W with the bundled intensity week (the floor stays).
pub const FLOOR_EXCHANGE_W: f64 = 200.0;

/// The default of `ControllerConfig::clock_down_sigmas`.
pub const CLOCK_DOWN_SIGMAS: f64 = 1.0;

/// Attainment below which a pool's planning capacity shrinks.
pub const ATTAINMENT_TARGET: f64 = 0.99;
/// A dip in a window shorter than `attainment_min_requests` (early in a run, or a rare class)
/// counts as a miss only where a class holding exactly [`ATTAINMENT_TARGET`] would show as many
/// misses or more with at most this probability ([`miss_evidence`](super::miss_evidence)): three
/// late first tokens among 200 requests (98.5%) happen to a class at its target one time in three,
/// eight (96%) one time in a thousand. Windows of enough requests are judged by their share
/// alone. In `sim` the rule changes nothing on the Coding week (seeds 1–3) or the Conversation hour
/// (×2, ×8, ×16, seeds 1–3); on the Coding curve with Conversation lengths it moves the class-hours
/// below 99% from 11 to 14 over six runs, energy within ±1.7% either way (the first hour's
/// decisions differ and the weeks diverge from there). Applied to every window instead, 0.1, 0.2
/// and 0.5 cost that curve 0.8–1.7% and 2–3 class-hours (seed 1): the windows of enough requests
/// need the share. What it is for is a real cluster's first minutes: one stray late token in a
/// young window shrank a pool's capacity for the rest of the hour in the 15× rehearsal.
pub const MISS_EVIDENCE_P: f64 = 0.2;

/// Attainment at or above which it grows (the default of `ControllerConfig::attainment_comfort`).
pub const ATTAINMENT_COMFORT: f64 = 0.996;

/// How long the capacity scale a miss left a pool with at one size still speaks for that size
/// (s): a day, so the last daily peak's lesson holds through the next. On the week-long Coding
/// run (with the scale recorded at every window) an hour of memory kept none of the gain and 6
/// hours about half of it.
pub const SIZE_SCALE_MEMORY_S: f64 = 86_400.0;

/// The default of `ControllerConfig::mix_hysteresis`.
pub const MIX_HYSTERESIS: f64 = 0.04;

/// The longest `retire_min_age_s` (a week).
pub const MAX_RETIRE_MIN_AGE_S: f64 = 604_800.0;

/// The controller settings that both the service config and `sim`'s flags take: one range
/// check each, so the two cannot drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// `retire_min_age_s`: seconds, 0 to a week.
    RetireMinAgeS,
    /// `clock_margin_floor`: at least 0.1, at most 1.
    ClockMarginFloor,
    /// `attainment_comfort`: above [`ATTAINMENT_TARGET`], at most 1.
    AttainmentComfort,
    /// `clock_down_sigmas`: 0 to 100.
    ClockDownSigmas,
    /// `mix_hysteresis`: at least 0, below 1.
    MixHysteresis,
}

impl Tuning {
    /// `None` when `v` is in the setting's range, else what it must be and what it was.
    pub fn out_of_range(self, v: f64) -> Option<String> {
        let (ok, must) = match self {
            Tuning::RetireMinAgeS => (
                (0.0..=MAX_RETIRE_MIN_AGE_S).contains(&v),
                format!("a number of seconds in [0, {MAX_RETIRE_MIN_AGE_S}]"),
            ),
            Tuning::ClockMarginFloor => ((0.1..=1.0).contains(&v), "at least 0.1 and at most 1".to_string()),
            Tuning::AttainmentComfort => {
                (v > ATTAINMENT_TARGET && v <= 1.0, format!("above the {ATTAINMENT_TARGET} target and at most 1"))
            }
            Tuning::ClockDownSigmas => ((0.0..=100.0).contains(&v), "a number in [0, 100]".to_string()),
            Tuning::MixHysteresis => ((0.0..1.0).contains(&v), "at least 0 and below 1".to_string()),
        };
        // `1e300`, not three hundred digits.
        let shown = if v != 0.0 && (v.abs() >= 1e9 || v.abs() < 1e-4) { format!("{v:e}") } else { format!("{v}") };
        (!ok).then(|| format!("must be {must}, got {shown}"))
    }
}
/// The most the learnt capacity may exceed the profile's single-instance capacity
/// (a pool behind least-outstanding routing queues far less than one instance alone).
/// On the week-long Coding replay 3× gave 0.600× single-pool's energy, 3.5× 0.570×,
/// 4× 0.555×, 4.5× 0.561× and 5× 0.578× (the learner overshoots and backs off more),
/// every class ≥ 99.6% throughout.
pub const MAX_CAPACITY_SCALE: f64 = 4.0;

/// The share of what a pool's serving instances are credited with (profile capacity × utilisation
/// limit × learnt scale) that its load must take for a comfortable window to grow the scale (but
/// see [`UNTESTED_GROWTH_MIN_INSTANCES`]). A pool that carries less has not tested its capacity:
/// before this rule the scale of a pool held at one instance, or at more instances than its plan
/// because a smaller size once missed, grew to the ceiling with no evidence. Swept with no
/// exception for large pools, seed 1 unless said (docs/controller.md has the table): 0.5 gave the
/// Coding week 3,943.9 kWh with 4 class-hours below 99%, 0.6 3,912.2 with 0, 0.7 3,968.7 with 2,
/// 0.8 4,027.8 with 0 (none: 3,984.0 with 4); on the Coding curve with Conversation lengths at
/// seeds 1–3, 0.6 had 0–1 class-hours below 99% where none had 7–8.
pub const CAPACITY_EVIDENCE_SHARE: f64 = 0.6;

/// A pool serving at least this many instances, none of them beyond its plan, grows its learnt
/// scale on a comfortable window even when its load took less than [`CAPACITY_EVIDENCE_SHARE`]:
/// the growth can only retire one instance, whose load the others take up by a third at most, and
/// the next window tests what is left. Smaller pools wait for evidence (a pool of two that drops
/// one doubles the other's load: the Conversation hour at ×16, seed 3, lost ML's P99 that way).
/// With the evidence rule alone the Conversation hour at ×16 and ×8 took 5–7% more energy than
/// before it (seeds 1–3), and a budget of 70% of `single-pool`'s peak at ×8 no longer carried
/// the load (LL shed); from 2 instances ML missed at ×16, seed 3 (98.14%); from 3 the learnt
/// scale crept up over six steady hours without settling (`cli/tests/learning_converges.rs`);
/// from 4 every class held on every run measured, at 2–6% more energy on the hours (×2 to ×16).
pub const UNTESTED_GROWTH_MIN_INSTANCES: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_of_an_hour_is_its_periods_else_the_constant() {
        let mut c = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980);
        assert_eq!(c.power_budget_at(0.0), None);
        c.power_budget_w = Some(100.0);
        c.power_budget_periods = vec![
            BudgetPeriod { from_h: 16, to_h: 21, power_w: 40.0 },
            BudgetPeriod { from_h: 22, to_h: 2, power_w: 70.0 },
        ];
        let at = |c: &ControllerConfig, h: f64| c.power_budget_at(h * 3600.0 + 1.0);
        assert_eq!(at(&c, 15.0), Some(100.0));
        assert_eq!(at(&c, 16.0), Some(40.0));
        assert_eq!(at(&c, 20.0), Some(40.0));
        assert_eq!(at(&c, 21.0), Some(100.0));
        assert_eq!(at(&c, 23.0), Some(70.0), "a period wraps past midnight");
        assert_eq!(at(&c, 25.0), Some(70.0), "the day repeats");
        assert_eq!(at(&c, 26.0), Some(100.0));
        // The day's hours count from the offset: at time zero it is 16:00.
        c.budget_day_offset_s = 16.0 * 3600.0;
        assert_eq!(c.power_budget_at(1.0), Some(40.0));
        // Without the constant, hours outside every period have no budget.
        c.power_budget_w = None;
        c.budget_day_offset_s = 0.0;
        assert_eq!(c.power_budget_at(6.0 * 3600.0), None);
    }
}
