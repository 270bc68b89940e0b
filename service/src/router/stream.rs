//! What the router measures of each answer it streams back, as the client
//! sees it: the time to the first token (from the request's arrival at the
//! router) and every gap between tokens after it, judged against the class's
//! SLOs. An engine may put several tokens in one event (speculative decoding)
//! and the network may put several events in one chunk: a chunk carrying k
//! tokens after a gap g counts as k gaps of g/k, and the tokens of each event
//! are counted from its content with the BPE, rescaled at the end to the
//! engine's own `usage.completion_tokens` when the answer reports it.
//! A twin engine stamps its tokens with its own time: its part of each
//! interval is then taken from the stamps and only the rest (sockets, the
//! router's work) from the wall, at the wall's rate
//! ([`telemetry::cluster_interval_s`]), so a rehearsal sped up 15× does not
//! count a millisecond of the machine's scheduling as 15.

use crate::openai::text_tokens;
use serde_json::Value;
use telemetry::ClassSlo;

/// The most bytes of a stream held while an event is incomplete; past it the
/// stream is passed on unmeasured (a stream without event breaks is no SSE).
const MAX_PENDING_BYTES: usize = 1 << 20;
/// The most token gaps remembered per answer (a longer answer's gaps beyond
/// it are judged as they come and not rescaled).
const MAX_EVENTS: usize = 65_536;

/// The SLO verdict on one answer: `[ttft_ok, ttft_n, gaps_ok, gaps_n]`, the
/// counters the controller learns from, and the output tokens seen.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Verdict {
    /// The cumulative-counter increments.
    pub counts: [u64; 4],
    /// Output tokens (the engine's usage when given, else counted).
    pub output_tokens: u32,
}

impl Verdict {
    /// A request that got no answer (refused, or its engine failed): a TTFT miss.
    pub fn missed() -> Verdict {
        Verdict { counts: [0, 1, 0, 0], output_tokens: 0 }
    }
}

/// The measurement of one streamed answer.
#[derive(Debug)]
pub struct Measure {
    slo: ClassSlo,
    arrived_s: f64,
    /// Gaps are judged only for one sequence (a batch or `n` > 1 interleaves several).
    single: bool,
    first_s: Option<f64>,
    last_s: f64,
    first_tokens: u32,
    events: Vec<(f64, u32)>,
    overflow: [u64; 2],
    usage: Option<u32>,
    pending: Vec<u8>,
    broken: bool,
    /// Service seconds per wall second.
    speed: f64,
    /// How long the router held the request for a serving instance (service s).
    held_s: f64,
    /// The engine's stamps: when the request reached it, and its latest token.
    engine_arrived_s: Option<f64>,
    engine_last_s: Option<f64>,
    /// The latest stamp of the events being read.
    event_stamp_s: Option<f64>,
    /// When the engine sent the latest of the events being read (Unix s).
    event_sent_s: Option<f64>,
    /// The latest token's travel from the engine to the router (wall s).
    last_transport_s: Option<f64>,
}

impl Measure {
    /// A request of a class with these SLOs, arrived at `arrived_s` (service
    /// seconds), asking for `sequences` sequences.
    pub fn new(slo: ClassSlo, arrived_s: f64, sequences: u32) -> Measure {
        Measure {
            slo,
            arrived_s,
            single: sequences <= 1,
            first_s: None,
            last_s: arrived_s,
            first_tokens: 0,
            events: Vec::new(),
            overflow: [0, 0],
            usage: None,
            pending: Vec::new(),
            broken: false,
            speed: 1.0,
            held_s: 0.0,
            engine_arrived_s: None,
            engine_last_s: None,
            event_stamp_s: None,
            event_sent_s: None,
            last_transport_s: None,
        }
    }

    /// Service seconds per wall second (1 unless the cluster runs sped up), and how long the
    /// router held the request for a serving instance (service seconds).
    pub fn with_time(mut self, speed: f64, held_s: f64) -> Measure {
        self.speed = if speed.is_finite() && speed > 0.0 { speed } else { 1.0 };
        self.held_s = held_s.max(0.0);
        self
    }

    /// An interval of `wall_service_s` service seconds by the wall clock, of which the engine
    /// stamps say `engine_s` (see the module docs).
    fn interval(&self, wall_service_s: f64, engine_s: Option<f64>, held_s: f64) -> f64 {
        match engine_s {
            Some(_) => telemetry::cluster_interval_s(wall_service_s / self.speed, engine_s, held_s, self.speed),
            None => wall_service_s,
        }
    }

    /// Bytes of the stream that reached the router at `now_s`.
    pub fn chunk(&mut self, now_s: f64, bytes: &[u8]) {
        if self.broken {
            return;
        }
        self.pending.extend_from_slice(bytes);
        let mut tokens = 0u32;
        while let Some((end, skip)) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end + skip).take(end).collect();
            tokens = tokens.saturating_add(self.event(&event));
        }
        if self.pending.len() > MAX_PENDING_BYTES {
            self.broken = true;
            self.pending = Vec::new();
        }
        if tokens == 0 {
            return;
        }
        let stamp = self.event_stamp_s.take();
        let transport = self.event_sent_s.take().map(|sent| (telemetry::unix_now_s() - sent).max(0.0));
        let prev_transport = std::mem::replace(&mut self.last_transport_s, transport);
        match self.first_s {
            None => {
                let engine = stamp.zip(self.engine_arrived_s).map(|(t, a)| (t - a).max(0.0));
                let ttft = self.interval(now_s - self.arrived_s, engine, self.held_s);
                self.first_s = Some(self.arrived_s + ttft);
                self.first_tokens = tokens;
                self.engine_last_s = stamp;
            }
            Some(_) => {
                let engine = stamp.zip(self.engine_last_s).map(|(t, l)| (t - l).max(0.0));
                if stamp.is_some() {
                    self.engine_last_s = stamp;
                }
                let gap = match (engine, transport, prev_transport) {
                    (Some(e), Some(t), Some(p)) => telemetry::stamped_gap_s(e, t, p),
                    _ => self.interval((now_s - self.last_s).max(0.0), engine, 0.0),
                };
                if self.events.len() < MAX_EVENTS {
                    self.events.push((gap, tokens));
                } else {
                    let ok = gap / f64::from(tokens) <= self.slo.tbt_s;
                    self.overflow[0] += if ok { u64::from(tokens) } else { 0 };
                    self.overflow[1] += u64::from(tokens);
                }
            }
        }
        self.last_s = now_s;
    }

    /// The tokens of one SSE event's content; notes the usage it reports.
    fn event(&mut self, event: &[u8]) -> u32 {
        let Ok(text) = std::str::from_utf8(event) else { return 0 };
        let mut n = 0u32;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" || data.is_empty() {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
                self.usage = Some(u.min(u64::from(u32::MAX)) as u32);
            }
            if let Some(t) = v[telemetry::TWIN_TOKEN_STAMP].as_f64().filter(|t| t.is_finite()) {
                self.event_stamp_s = Some(self.event_stamp_s.map_or(t, |s: f64| s.max(t)));
            }
            if let Some(s) = v[telemetry::TWIN_SENT_STAMP].as_f64().filter(|s| s.is_finite()) {
                self.event_sent_s = Some(self.event_sent_s.map_or(s, |x: f64| x.max(s)));
            }
            if let Some(a) = v[telemetry::TWIN_ARRIVAL_STAMP].as_f64().filter(|a| a.is_finite()) {
                self.engine_arrived_s.get_or_insert(a);
            }
            for c in v["choices"].as_array().into_iter().flatten() {
                let mut texts: Vec<&str> = vec![
                    c["text"].as_str().unwrap_or(""),
                    c["delta"]["content"].as_str().unwrap_or(""),
                    c["delta"]["reasoning_content"].as_str().unwrap_or(""),
                ];
                for t in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                    texts.push(t["function"]["name"].as_str().unwrap_or(""));
                    texts.push(t["function"]["arguments"].as_str().unwrap_or(""));
                }
                let k: u32 = texts.iter().filter(|t| !t.is_empty()).map(|t| text_tokens(t).max(1)).sum();
                n = n.saturating_add(k);
            }
        }
        n
    }

    /// The verdict once the stream is over (or the client left).
    pub fn finish(self) -> Verdict {
        let Some(first_s) = self.first_s else { return Verdict::missed() };
        let mut counts = [0u64; 4];
        counts[1] = 1;
        counts[0] = u64::from(first_s - self.arrived_s <= self.slo.ttft_s);
        let counted: u64 = u64::from(self.first_tokens) + self.events.iter().map(|e| u64::from(e.1)).sum::<u64>();
        let output_tokens = self.usage.unwrap_or(counted.min(u64::from(u32::MAX)) as u32);
        if self.single && !self.broken {
            // The engine's own count of the tokens, where it gives one, rescales the BPE's.
            let scale = match self.usage {
                Some(u) if counted > 0 => f64::from(u) / counted as f64,
                _ => 1.0,
            };
            for (gap, k) in &self.events {
                let k = ((f64::from(*k) * scale).round() as u64).max(1);
                let ok = gap / k as f64 <= self.slo.tbt_s;
                counts[2] += if ok { k } else { 0 };
                counts[3] += k;
            }
            counts[2] += self.overflow[0];
            counts[3] += self.overflow[1];
        }
        Verdict { counts, output_tokens }
    }
}

/// Where the first complete event ends in `buf` (index of its blank line)
/// and how many separator bytes follow it.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLO: ClassSlo = ClassSlo { ttft_s: 1.0, tbt_s: 0.1 };

    fn event(text: &str) -> String {
        format!("data: {}\n\n", serde_json::json!({ "choices": [{ "index": 0, "delta": { "content": text } }] }))
    }

    /// Tokens arriving one per event, 50 ms apart, hold a 100 ms TBT; a
    /// 300 ms stall is one miss; the first token at 0.5 s holds the TTFT.
    #[test]
    fn gaps_and_the_first_token_are_judged_as_the_client_sees_them() {
        let mut m = Measure::new(SLO, 10.0, 1);
        m.chunk(10.5, event(" hello").as_bytes());
        let mut t = 10.5;
        for i in 0..10 {
            t += if i == 5 { 0.3 } else { 0.05 };
            m.chunk(t, event(" world").as_bytes());
        }
        m.chunk(t, b"data: [DONE]\n\n");
        let v = m.finish();
        assert_eq!(v.counts, [1, 1, 9, 10]);
        assert_eq!(v.output_tokens, 11);
    }

    /// Four tokens per event every 200 ms is 50 ms per token: held, not four
    /// 200 ms misses; the engine's usage rescales what the BPE counted.
    #[test]
    fn several_tokens_per_event_are_several_gaps() {
        let mut m = Measure::new(SLO, 0.0, 1);
        m.chunk(0.2, event(" a b c d").as_bytes());
        for i in 1..=5 {
            m.chunk(0.2 + 0.2 * f64::from(i), event(" a b c d").as_bytes());
        }
        let usage = serde_json::json!({ "choices": [], "usage": { "prompt_tokens": 3, "completion_tokens": 24 } });
        m.chunk(1.2, format!("data: {usage}\n\ndata: [DONE]\n\n").as_bytes());
        let v = m.finish();
        assert_eq!(v.output_tokens, 24);
        assert_eq!((v.counts[2], v.counts[3]), (20, 20));
    }

    /// Events split across chunks and several events in one chunk are read
    /// whole; an answer with no token is a TTFT miss; a batch's gaps are not judged.
    /// A twin engine 15× faster than the wall stamps its tokens: a gap of
    /// 40 ms by its stamps that reached the router 6 ms of wall late (90 ms
    /// of the cluster's time at 15×) counts as 46 ms, not 130 ms; the TTFT is
    /// the router's hold, the engine's part by its stamps, and the rest at
    /// the wall's rate. Without stamps the wall interval counts, sped up.
    #[test]
    fn a_stamped_engine_is_measured_in_its_own_time() {
        let stamped = |text: &str, t: f64, arrived: Option<f64>| {
            let mut v = serde_json::json!({ "choices": [{ "index": 0, "delta": { "content": text } }] });
            v[telemetry::TWIN_TOKEN_STAMP] = serde_json::json!(t);
            if let Some(a) = arrived {
                v[telemetry::TWIN_ARRIVAL_STAMP] = serde_json::json!(a);
            }
            format!("data: {v}\n\n")
        };
        let speed = 15.0;
        // Arrived at service time 100; held 0.3 s; the engine took 0.5 s by its stamps (1000.0 → 1000.5);
        // the first token reached the router at wall (0.3 + 0.5) / 15 + 2 ms.
        let mut m = Measure::new(SLO, 100.0, 1).with_time(speed, 0.3);
        let first_wall = 0.8 / speed + 0.002;
        m.chunk(100.0 + first_wall * speed, stamped(" a", 1000.5, Some(1000.0)).as_bytes());
        let second_wall = first_wall + 0.04 / speed + 0.006;
        m.chunk(100.0 + second_wall * speed, stamped(" b", 1000.54, None).as_bytes());
        assert!((m.first_s.unwrap() - 100.0 - 0.802).abs() < 1e-9, "{:?}", m.first_s);
        assert!((m.events[0].0 - 0.046).abs() < 1e-9, "{:?}", m.events);
        let v = m.finish();
        assert_eq!(v.counts, [1, 1, 1, 1]);
        // The same wall times without stamps: the TTFT is (0.8/15 + 2 ms) × 15 = 0.83 s, the gap 130 ms.
        let mut raw = Measure::new(SLO, 100.0, 1).with_time(speed, 0.3);
        raw.chunk(100.0 + first_wall * speed, event(" a").as_bytes());
        raw.chunk(100.0 + second_wall * speed, event(" b").as_bytes());
        assert!((raw.events[0].0 - 0.13).abs() < 1e-9, "{:?}", raw.events);
        assert_eq!(raw.finish().counts, [1, 1, 0, 1]);
    }

    /// With the engine's send time stamped too, an engine late to send (its
    /// process starved of CPU) delays both ends of a token's travel alike and
    /// counts nothing: the gap is the engine's, 40 ms, however late by the
    /// wall. A token 30 ms longer on its way than the one before (a late
    /// router) makes the gap 30 ms longer.
    #[test]
    fn the_engines_send_stamp_tells_a_late_engine_from_a_late_path() {
        let stamped = |t: f64, sent_ago_s: f64| {
            let mut v = serde_json::json!({ "choices": [{ "index": 0, "delta": { "content": " w" } }] });
            v[telemetry::TWIN_TOKEN_STAMP] = serde_json::json!(t);
            v[telemetry::TWIN_SENT_STAMP] = serde_json::json!(telemetry::unix_now_s() - sent_ago_s);
            format!("data: {v}\n\n")
        };
        let mut m = Measure::new(SLO, 0.0, 1).with_time(15.0, 0.0);
        m.chunk(0.1, stamped(10.0, 0.001).as_bytes());
        // A second of the wall later (15 s of service time), but only 1 ms on its way.
        m.chunk(15.1, stamped(10.04, 0.001).as_bytes());
        // 31 ms on its way.
        m.chunk(15.2, stamped(10.08, 0.031).as_bytes());
        assert!((m.events[0].0 - 0.04).abs() < 0.005, "{:?}", m.events);
        assert!((m.events[1].0 - 0.07).abs() < 0.005, "{:?}", m.events);
    }

    #[test]
    fn events_are_read_across_chunk_boundaries() {
        let mut m = Measure::new(SLO, 0.0, 1);
        let two = format!("{}{}", event(" x"), event(" y"));
        let (a, b) = two.as_bytes().split_at(10);
        m.chunk(0.1, a);
        m.chunk(0.2, b);
        let v = m.finish();
        assert_eq!(v.counts[..2], [1, 1]);
        assert_eq!(v.output_tokens, 2);
        assert_eq!(Measure::new(SLO, 0.0, 1).finish(), Verdict::missed());
        let mut batch = Measure::new(SLO, 0.0, 2);
        batch.chunk(0.1, event(" x").as_bytes());
        batch.chunk(5.0, event(" y").as_bytes());
        assert_eq!(batch.finish().counts, [1, 1, 0, 0]);
    }
}
