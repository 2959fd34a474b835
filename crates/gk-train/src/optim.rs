//! AdamW with parameter groups, gradient clipping and the learning-rate schedule.
//!
//! Written here rather than using `candle_nn::AdamW` because exact resume needs the
//! moments saved and restored, and groups need their own learning rates. Update rule as
//! `torch.optim.AdamW` (decoupled weight decay, bias correction).

use crate::error::{Result, TrainError};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// A parameter group: every parameter whose name starts with `prefix` (first match wins;
/// `""` catches the rest) trains at `lr_scale * base lr`; a scale of 0 freezes it. A `*` in
/// the prefix stands for any run of characters (`visual.encoder.layers.*.lora_A.s1.`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGroup {
    pub prefix: String,
    pub lr_scale: f64,
}

/// Learning-rate schedule kinds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// Linear warm-up then cosine decay to `min_ratio * lr` at the last step.
    Cosine {
        min_ratio: f64,
    },
    /// Linear warm-up then `lr * gamma` from `drop_at` (a fraction of all steps) on (TransVG's StepLR).
    Step {
        drop_at: f64,
        gamma: f64,
    },
    Constant,
}

/// Whether `pattern` (`*` = any run of characters) matches a prefix of `name`.
pub fn glob_prefix(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => name.starts_with(pattern),
        Some((head, rest)) => name.strip_prefix(head).is_some_and(|tail| {
            (0..=tail.len())
                .filter(|&j| tail.is_char_boundary(j))
                .any(|j| glob_prefix(rest, &tail[j..]))
        }),
    }
}

/// The learning-rate multiplier at `step` (0-based) of `total`, with `warmup` steps.
pub fn lr_factor(schedule: Schedule, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Cosine { min_ratio } => {
            min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
        Schedule::Step { drop_at, gamma } => {
            if step as f64 >= drop_at * total as f64 {
                gamma
            } else {
                1.0
            }
        }
        Schedule::Constant => 1.0,
    }
}

struct Slot {
    name: String,
    var: Var,
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
}

/// AdamW over the trainable parameters of a `VarMap`.
pub struct AdamW {
    slots: Vec<Slot>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimiser steps taken (for bias correction).
    pub t: usize,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.slots.len())
            .field("t", &self.t)
            .finish()
    }
}

impl AdamW {
    /// Groups the parameters of `map` by name (sorted, so the order is stable).
    pub fn new(map: &VarMap, groups: &[ParamGroup], weight_decay: f64) -> Result<Self> {
        let data = map
            .data()
            .lock()
            .map_err(|_| TrainError::Config("poisoned var map".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut slots = Vec::new();
        for name in names {
            let scale = groups
                .iter()
                .find(|g| glob_prefix(&g.prefix, name))
                .map_or(1.0, |g| g.lr_scale);
            if scale == 0.0 {
                continue;
            }
            let var = data[name].clone();
            slots.push(Slot {
                name: name.clone(),
                m: var.zeros_like()?,
                v: var.zeros_like()?,
                var,
                lr_scale: scale,
            });
        }
        Ok(Self {
            slots,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
        })
    }

    /// Names of the parameters being trained.
    pub fn trained(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping. `max_norm <= 0` only measures.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
        let mut sq = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(&s.var) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        if max_norm > 0.0 && norm > max_norm {
            let k = max_norm / (norm + 1e-6);
            for s in &self.slots {
                if let Some(g) = grads.remove(&s.var) {
                    grads.insert(&s.var, (g * k)?);
                }
            }
        }
        Ok(norm)
    }

    /// One update at base learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            let lr = lr * s.lr_scale;
            s.m = ((&s.m * b1)? + (g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&s.m / bc1)? / ((&s.v / bc2)?.sqrt()? + self.eps)?)?;
            let decayed = (s.var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            s.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Saves the moments (`m.NAME`, `v.NAME`) to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for s in &self.slots {
            map.insert(format!("m.{}", s.name), s.m.clone());
            map.insert(format!("v.{}", s.name), s.v.clone());
        }
        crate::weights::save_tensors_atomic(&map, path)
    }

    /// Restores moments saved by [`AdamW::save`]; every trained parameter must be present.
    pub fn load(&mut self, path: &Path, t: usize) -> Result<()> {
        let dev = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let file = crate::weights::read_safetensors(path, &dev)?;
        for s in &mut self.slots {
            let get = |k: String| {
                file.get(&k).cloned().ok_or_else(|| TrainError::Format {
                    path: path.to_path_buf(),
                    msg: format!("optimiser state has no {k}"),
                })
            };
            s.m = get(format!("m.{}", s.name))?;
            s.v = get(format!("v.{}", s.name))?;
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn glob_prefixes() {
        let n = "visual.encoder.layers.3.self_attn.q_proj.lora_A.s1.weight";
        assert!(glob_prefix("visual.encoder", n));
        assert!(glob_prefix("visual.encoder.layers.3.*.lora_*.s1.", n));
        assert!(!glob_prefix("visual.encoder.layers.3.*.lora_*.s2.", n));
        assert!(!glob_prefix(
            "visual.encoder.layers.1*.lora",
            "visual.encoder.layers.3.x.lora"
        ));
        assert!(!glob_prefix(
            "visual.encoder.layers.1.",
            "visual.encoder.layers.10.x"
        ));
        assert!(glob_prefix("*", n) && glob_prefix("", n));
    }

    #[test]
    fn schedule_shapes() {
        let c = Schedule::Cosine { min_ratio: 0.0 };
        assert!((lr_factor(c, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((lr_factor(c, 9, 100, 10) - 1.0).abs() < 1e-12);
        assert!((lr_factor(c, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!(lr_factor(c, 100, 100, 10).abs() < 1e-12);
        let s = Schedule::Step {
            drop_at: 0.5,
            gamma: 0.1,
        };
        assert_eq!(lr_factor(s, 49, 100, 0), 1.0);
        assert_eq!(lr_factor(s, 50, 100, 0), 0.1);
    }

    #[test]
    fn adamw_matches_torch_first_steps() {
        // torch 2.14: p = tensor([1., -2.]); opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
        // three steps of loss = (p**2).sum() give the values below.
        let map = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let p = vb
            .get_with_hints(2, "p", candle_nn::Init::Const(0.0))
            .unwrap();
        map.data().lock().unwrap()["p"]
            .set(&Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap())
            .unwrap();
        let mut opt = AdamW::new(&map, &[], 0.01).unwrap();
        for want in [
            [0.899f32, -1.898],
            [0.798519, -1.796273],
            [0.698911, -1.694945],
        ] {
            let grads = p.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            opt.step(&grads, 0.1).unwrap();
            let got = p.to_vec1::<f32>().unwrap();
            assert!(
                (got[0] - want[0]).abs() < 2e-6 && (got[1] - want[1]).abs() < 2e-6,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn frozen_groups_are_not_trained() {
        let map = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        vb.get_with_hints(2, "visual.w", candle_nn::Init::Const(1.0))
            .unwrap();
        vb.get_with_hints(2, "head.w", candle_nn::Init::Const(1.0))
            .unwrap();
        let opt = AdamW::new(
            &map,
            &[ParamGroup {
                prefix: "visual.".into(),
                lr_scale: 0.0,
            }],
            0.0,
        )
        .unwrap();
        assert_eq!(opt.trained().collect::<Vec<_>>(), vec!["head.w"]);
    }
}
