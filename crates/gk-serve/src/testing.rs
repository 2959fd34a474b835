//! A stand-in model for the server's tests: answers from the expression's length, fails
//! blank expressions as the tokenizer does, can hold its first forward at a gate, and
//! records every forward's size.

use gk_box::Letterbox;
use gk_train::infer::{Answer, GroundingModel, ModelInfo, Query};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    gate_open: bool,
    running: usize,
    batches: Vec<usize>,
}

pub struct FakeModel {
    info: ModelInfo,
    gated: bool,
    state: Mutex<State>,
    changed: Condvar,
    delay: Duration,
}

impl FakeModel {
    pub fn new() -> Self {
        Self {
            info: ModelInfo {
                kind: "fake".into(),
                run: "fake-run".into(),
                weights: "fake.safetensors".into(),
                image_size: 32,
                max_text_len: 8,
                parameters: 0,
                batch_dependent: None,
                data: gk_train::train::RunConfig::synth(std::path::Path::new("."), 1).data,
            },
            gated: false,
            state: Mutex::default(),
            changed: Condvar::new(),
            delay: Duration::ZERO,
        }
    }

    /// Its first forward waits for [`FakeModel::open_gate`].
    pub fn gated() -> Self {
        Self {
            gated: true,
            ..Self::new()
        }
    }

    /// Each forward takes `delay`.
    pub fn slow(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::new()
        }
    }

    pub fn answer_for(expr: &str, w: u32, h: u32) -> Answer {
        let k = expr.chars().count() as f32;
        let cx = (0.1 * k).min(0.9);
        Answer::from_model_box([cx, 0.5, 0.1, 0.2], Letterbox::centred(w, h, 32), w, h)
    }

    pub fn open_gate(&self) {
        self.state.lock().unwrap().gate_open = true;
        self.changed.notify_all();
    }

    /// Blocks until `n` forwards have started.
    pub fn wait_until_running(&self, n: usize) {
        let mut s = self.state.lock().unwrap();
        while s.running < n {
            s = self.changed.wait(s).unwrap();
        }
    }

    pub fn batch_sizes(&self) -> Vec<usize> {
        self.state.lock().unwrap().batches.clone()
    }
}

impl GroundingModel for FakeModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn ground(&self, queries: &[Query<'_>]) -> gk_train::Result<Vec<Answer>> {
        {
            let mut s = self.state.lock().unwrap();
            s.running += 1;
            s.batches.push(queries.len());
            self.changed.notify_all();
            while self.gated && !s.gate_open {
                s = self.changed.wait(s).unwrap();
            }
        }
        std::thread::sleep(self.delay);
        queries
            .iter()
            .map(|q| {
                if q.expr.trim().is_empty() {
                    return Err(gk_data::DataError::EmptyText.into());
                }
                let (w, h) = q.image.dimensions();
                Ok(Self::answer_for(q.expr, w, h))
            })
            .collect()
    }
}
