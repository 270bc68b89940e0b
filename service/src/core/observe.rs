//! What telemetry tells the core: arrivals, SLO counters, instance reports
//! and samples, folded into the windows and minute series the controller sees.

use super::*;

impl ServiceCore {
    /// Requests that arrived, per class.
    pub fn observe_arrivals(&mut self, now_s: f64, counts: &[u32; CLASS_COUNT]) {
        self.roll_minutes(now_s);
        for (c, &n) in counts.iter().enumerate() {
            self.window_counts[c] = self.window_counts[c].saturating_add(n);
            self.minute_counts[c] = self.minute_counts[c].saturating_add(n);
        }
    }

    /// Cumulative per-class SLO counters: `[ttft_ok, ttft_n, gaps_ok, gaps_n]`.
    pub fn observe_attainment(&mut self, totals: [[u64; 4]; CLASS_COUNT]) {
        self.att_totals = totals;
    }

    /// An engine's first tokens and token gaps since its previous page (its
    /// TTFT and TBT histograms' deltas), judged against the tightest SLO of
    /// the classes its pool serves and added to those of them that had
    /// arrivals this minute (all of them when none had): the attainment the
    /// controller learns from when it learns from the engines. The engines
    /// measure inside themselves, so a clock running faster than the wall's
    /// (a rehearsal) does not magnify the network's and the scheduler's jitter.
    pub fn observe_engine_latency(
        &mut self,
        instance: InstanceId,
        ttft: Option<&telemetry::scrape::Histogram>,
        tbt: Option<&telemetry::scrape::Histogram>,
    ) {
        if !self.attainment_from_engines {
            return;
        }
        let Some(pool) = self.instances.get(&instance).map(|r| r.pool) else { return };
        let routing = self.ctl.routing().pool_of;
        let classes: Vec<usize> = (0..CLASS_COUNT).filter(|&c| routing[c] == pool).collect();
        if classes.is_empty() {
            return;
        }
        let slos = self.ctl.profile().slos();
        let tightest =
            |f: fn(&telemetry::ClassSlo) -> f64| classes.iter().map(|&c| f(&slos[c])).fold(f64::INFINITY, f64::min);
        let (ttft_s, tbt_s) = (tightest(|s| s.ttft_s), tightest(|s| s.tbt_s));
        let judged = |h: Option<&telemetry::scrape::Histogram>, bound: f64| {
            h.filter(|h| h.count.is_finite() && h.count > 0.0).map_or((0.0, 0.0), |h| (h.count_within(bound), h.count))
        };
        let (t_ok, t_n) = judged(ttft, ttft_s);
        let (g_ok, g_n) = judged(tbt, tbt_s);
        let busy: Vec<usize> = classes.iter().copied().filter(|&c| self.minute_counts[c] > 0).collect();
        for c in if busy.is_empty() { classes } else { busy } {
            for (j, v) in [t_ok, t_n, g_ok, g_n].into_iter().enumerate() {
                self.engine_att[c][j] += v;
            }
        }
        self.att_totals = self.engine_att.map(|k| k.map(|v| v.round() as u64));
    }

    /// One instance's reading.
    pub fn observe_instance(&mut self, now_s: f64, r: &InstanceReport) {
        if r.state == ReportedState::Stopped {
            if let Some(rec) = self.instances.remove(&r.id) {
                self.retired_energy_j += r.energy_j.max(rec.energy_j);
            }
            return;
        }
        let Some(rec) = self.instances.get_mut(&r.id) else { return };
        let state = match r.state {
            ReportedState::Starting => InstanceState::Starting,
            ReportedState::Serving => InstanceState::Serving,
            _ => InstanceState::Draining,
        };
        if rec.state == InstanceState::Starting && state == InstanceState::Serving && !self.no_spawn_lead.remove(&r.id)
        {
            self.observed_spawn_s.push(now_s - rec.spawned_at_s);
        }
        // A retire asked for stays asked for, whatever a late reading says.
        if rec.state != InstanceState::Draining {
            rec.state = state;
        }
        rec.outstanding = r.outstanding;
        rec.waiting = r.waiting;
        rec.power_w = r.power_w;
        rec.energy_j = r.energy_j;
        rec.clock_mhz = r.clock_mhz;
        rec.last_report_s = Some(now_s);
    }

    /// A telemetry sample from a real cluster (MQTT or a scrape). GPU and
    /// engine samples are matched to the instance whose placement is on the
    /// sample's `site/node` (and, for GPUs, holds that GPU index); arrivals
    /// samples count per class. Samples of nodes the service did not place
    /// anything on are ignored.
    pub fn observe_sample(&mut self, now_s: f64, sample: &telemetry::sample::Sample) {
        use telemetry::sample::Sample;
        let tags = match sample {
            Sample::Gpu(g) => &g.tags,
            Sample::Engine(e) => &e.tags,
            Sample::Arrivals(a) => {
                if let Some(c) = a.tags.class {
                    // A count the window could not hold at a believable rate is refused, not planned for.
                    let period = self.cfg.controller.clock_period_s.max(1.0);
                    let window = f64::from(self.window_counts[c.index()]);
                    let n = a.requests;
                    if !(n.is_finite() && n >= 0.0) || (window + n) / period > self.max_class_rps {
                        self.counters.rejected_arrivals += 1;
                        tracing::warn!(
                            class = %c,
                            requests = n,
                            max_class_rps = self.max_class_rps,
                            "an arrivals sample beyond the ceiling was refused"
                        );
                        return;
                    }
                    let mut counts = [0u32; CLASS_COUNT];
                    counts[c.index()] = n.round() as u32;
                    self.observe_arrivals(now_s, &counts);
                }
                return;
            }
        };
        let Some(id) = self.instance_of(tags) else {
            self.counters.unmatched_samples += 1;
            return;
        };
        let Some(rec) = self.instances.get_mut(&id) else { return };
        rec.last_report_s = Some(now_s);
        match sample {
            Sample::Gpu(_) => rec.last_gpu_s = Some(now_s),
            Sample::Engine(_) => rec.last_engine_s = Some(now_s),
            Sample::Arrivals(_) => {}
        }
        match sample {
            Sample::Gpu(g) => {
                let e = g.energy_j.unwrap_or(rec.gpus.get(&g.tags.gpu.unwrap_or(0)).map_or(0.0, |x| x.1));
                rec.gpus.insert(g.tags.gpu.unwrap_or(0), (g.power_w, e));
                rec.power_w = rec.gpus.values().map(|x| x.0).sum();
                rec.energy_j = rec.gpus.values().map(|x| x.1).sum();
                if let Some(c) = g.sm_clock_mhz {
                    rec.clock_mhz = c;
                }
            }
            Sample::Engine(e) => {
                let running = e.running.unwrap_or(0.0).max(0.0).min(f64::from(u32::MAX)) as u32;
                let waiting = e.waiting.unwrap_or(0.0).max(0.0).min(f64::from(u32::MAX)) as u32;
                // An engine serving several models holds the requests of all of them.
                rec.queues.insert(e.tags.model.clone().unwrap_or_default(), (running, waiting));
                rec.outstanding = rec.queues.values().fold(0u32, |n, q| n.saturating_add(q.0).saturating_add(q.1));
                rec.waiting = rec.queues.values().fold(0u32, |n, q| n.saturating_add(q.1));
                // An engine that answers serves (unless it was asked to retire).
                if rec.state == InstanceState::Starting {
                    rec.state = InstanceState::Serving;
                    if !self.no_spawn_lead.remove(&id) {
                        self.observed_spawn_s.push(now_s - rec.spawned_at_s);
                    }
                }
            }
            Sample::Arrivals(_) => {}
        }
    }

    /// The instance a GPU or engine sample is about: the one its `instance`
    /// tag names (`i<id>`, as the scrape and agents set it); else the one
    /// placed on its node (`site/node`) that holds its GPU, or, for a sample
    /// naming no GPU, the only one placed on the node. Two instances on one
    /// node (two TP4 engines on an 8-GPU node) are told apart by GPU index
    /// or instance tag, never guessed: an ambiguous sample matches none.
    pub(super) fn instance_of(&self, tags: &telemetry::sample::Tags) -> Option<InstanceId> {
        if let Some(id) = tags.instance.as_deref().and_then(|i| i.strip_prefix('i')).and_then(|n| n.parse().ok()) {
            if self.instances.contains_key(&InstanceId(id)) {
                return Some(InstanceId(id));
            }
        }
        let node = match (&tags.site, &tags.node) {
            (Some(s), Some(n)) => format!("{s}/{n}"),
            (None, Some(n)) => n.clone(),
            _ => return None,
        };
        let on_node = self.instances.values().filter(|r| r.placement.as_ref().is_some_and(|p| p.node == node));
        let mut candidates = match tags.gpu {
            Some(g) => on_node
                .filter(|r| r.placement.as_ref().is_some_and(|p| p.gpus.contains(&g) || p.gpus.is_empty()))
                .collect::<Vec<_>>(),
            None => on_node.collect(),
        };
        // A placement that names its GPUs beats one that does not.
        if let Some(g) = tags.gpu {
            if candidates.iter().any(|r| r.placement.as_ref().is_some_and(|p| p.gpus.contains(&g))) {
                candidates.retain(|r| r.placement.as_ref().is_some_and(|p| p.gpus.contains(&g)));
            }
        }
        match candidates.as_slice() {
            [one] => Some(one.id),
            _ => None,
        }
    }

    pub(super) fn roll_minutes(&mut self, now_s: f64) {
        while ((self.minute + 1) as f64) * 60.0 <= now_s {
            self.forecasts.push_minute(std::array::from_fn(|c| f64::from(self.minute_counts[c])));
            self.minute_counts = [0; CLASS_COUNT];
            self.minute += 1;
        }
    }
}
