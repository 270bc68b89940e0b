//! The engine loop's own behaviour, on a paused clock.

use super::*;

/// Every token's stamp (engine s) of each of a few requests, the engine woken every `wake_s`.
fn stamps(wake_s: f64) -> Vec<Vec<f64>> {
    let physics = Physics::default_h100_llama70b();
    let metrics = Arc::new(EngineMetrics::new("llama2-70b").expect("metrics"));
    let mut e = Engine::new(physics, 2, 1200, 15.0, None, metrics);
    let mut rx = Vec::new();
    // Short and long prompts and outputs: many phases end (prefills done, requests finished).
    for (input, output) in [(200, 120), (800, 60), (60, 200), (1500, 90), (300, 150), (90, 40), (2000, 75)] {
        let (tx, r) = mpsc::unbounded_channel();
        e.submit(input, output, tx);
        rx.push(r);
    }
    let mut t = 0.0;
    while t < 60.0 {
        t += wake_s;
        e.advance(t);
    }
    rx.into_iter()
        .map(|mut r| {
            let mut v = Vec::new();
            while let Ok(o) = r.try_recv() {
                if let Out::Token { at_s, .. } = o {
                    v.push(at_s);
                }
            }
            v
        })
        .collect()
}

/// A sped-up engine process that wakes late (a busy machine) sends its tokens late, but stamps
/// each with the end of its own step: the gaps a client counts from the stamps are the engine's
/// steps, however the wake-ups fall. (The last step of a phase was once stamped with the next
/// wake-up's time: at 15×, 0.8% of a pool's gaps missed the TBT SLO that the same fleet at 1.5×
/// kept.)
#[tokio::test(start_paused = true)]
async fn token_stamps_do_not_depend_on_when_the_engine_wakes() {
    let fine = stamps(0.000_5);
    for wake_s in [0.013, 0.05, 0.2] {
        let late = stamps(wake_s);
        for (k, (a, b)) in fine.iter().zip(&late).enumerate() {
            assert_eq!(a.len(), b.len(), "request {k}: tokens, woken every {wake_s} s");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() < 1e-9,
                    "request {k} token {i}: stamped {y} woken every {wake_s} s, {x} every 0.5 ms"
                );
            }
        }
    }
    assert!(fine.iter().all(|v| !v.is_empty()));
}
