//! Helpers shared by gk-train's integration tests (each test file uses its own subset).
#![allow(dead_code)]

use candle_core::Tensor;
use gk_train::run::RunDir;

/// `max |a - b|` over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A JSON array of numbers.
pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The losses of a run's `train` events in `metrics.jsonl`, in order.
pub fn train_losses(run: &RunDir) -> Vec<f64> {
    std::fs::read_to_string(run.file("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}
