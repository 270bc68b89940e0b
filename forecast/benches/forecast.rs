//! Speed of fitting and forecasting: 9 classes on 4 weeks of 1-minute
//! history (acceptance: fit all 9 in ≤ 2 s, a forecast ≤ 1 ms per class).

use criterion::{criterion_group, criterion_main, Criterion};
use forecast::{ForecastConfig, Forecaster, ModelKind};

#[path = "../tests/common/mod.rs"]
mod common;

/// Nine classes with very different volumes (as in the Coding trace).
fn classes() -> Vec<Vec<f64>> {
    [900.0, 40.0, 5.0, 300.0, 20.0, 2.0, 120.0, 8.0, 0.5]
        .iter()
        .enumerate()
        .map(|(i, &base)| common::daily_weekly(28, 1, base, 100 + i as u64))
        .collect()
}

fn bench(c: &mut Criterion) {
    let series = classes();
    let fc = Forecaster::new(ForecastConfig::default()).expect("valid config");
    let mut group = c.benchmark_group("forecast");
    group.sample_size(10);
    group.bench_function("fit_9_classes_4_weeks_1min_mstl_ets", |b| {
        b.iter(|| {
            for s in &series {
                std::hint::black_box(fc.fit(s, ModelKind::MstlEts).expect("fit"));
            }
        })
    });
    let models: Vec<_> = series.iter().map(|s| fc.fit(s, ModelKind::MstlEts).expect("fit")).collect();
    for (name, h) in [("predict_1_class_30min", 30), ("predict_1_class_1440min", 1440)] {
        group.bench_function(name, |b| b.iter(|| std::hint::black_box(models[0].predict(h, 0.95).expect("predict"))));
    }
    group.bench_function("update_1_class_1_step", |b| {
        let mut m = models[0].clone();
        b.iter(|| m.update(std::hint::black_box(&[850.0])).expect("update"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
