//! LoRA (Hu et al. 2021) on linear layers, in stackable sets: HiVG's hierarchical LoRA
//! (`shared/methods.md` §3.2) adds one set per training stage on top of the frozen earlier
//! ones, and inference merges them all into the base weights.
//!
//! A [`LoraLinear`] is a base linear layer `W x + b` plus, for every set `s` whose target
//! patterns match the layer's path, `(α_s / r_s) · B_s A_s dropout(x)`. Keys follow peft:
//! the base keeps its own `weight`/`bias` (so pretrained Hugging Face weights load
//! unchanged), set `s` adds `lora_A.<s>.weight` `[r, in]` (Kaiming-uniform) and
//! `lora_B.<s>.weight` `[out, r]` (zeros: a new set starts as the identity). Which sets
//! train is the optimiser's business (parameter groups by name prefix).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// One LoRA set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The set's name in parameter keys (`lora_A.<name>.weight`).
    pub name: String,
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the set's input in training.
    #[serde(default)]
    pub dropout: f32,
    /// The set applies to a layer whose path (its `VarBuilder` prefix) ends with one of
    /// these, matched on whole path segments: `"q_proj"` matches `...self_attn.q_proj`,
    /// `"self_attn.out_proj"` matches every attention output projection.
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// HiVG's setting: rank 32, α 16, dropout 0.1 on the attention projections.
    pub fn hivg(name: &str) -> Self {
        Self {
            name: name.to_string(),
            rank: 32,
            alpha: 16.0,
            dropout: 0.1,
            targets: ["q_proj", "k_proj", "v_proj", "out_proj"]
                .map(String::from)
                .to_vec(),
        }
    }

    /// Whether the layer at `path` (dot-separated) is a target.
    pub fn matches(&self, path: &str) -> bool {
        self.targets.iter().any(|t| {
            path == t
                || path
                    .strip_suffix(t.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }
}

#[derive(Debug, Clone)]
struct LoraSet {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f32,
}

/// A linear layer with the LoRA sets that target it.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    sets: Vec<LoraSet>,
}

/// `candle_nn::linear` plus the sets of `lora` that target `vb`'s path.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    lora: &[LoraConfig],
) -> Result<LoraLinear> {
    let base = candle_nn::linear(in_dim, out_dim, vb.clone())?;
    let path = vb.prefix();
    let mut sets = Vec::new();
    for c in lora.iter().filter(|c| c.matches(&path)) {
        if c.rank == 0 {
            candle_core::bail!("LoRA set {}: rank 0", c.name);
        }
        let a = vb.pp("lora_A").pp(&c.name).get_with_hints(
            (c.rank, in_dim),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
        )?;
        let b = vb.pp("lora_B").pp(&c.name).get_with_hints(
            (out_dim, c.rank),
            "weight",
            Init::Const(0.0),
        )?;
        sets.push(LoraSet {
            a,
            b,
            scale: c.alpha / c.rank as f64,
            dropout: c.dropout,
        });
    }
    Ok(LoraLinear { base, sets })
}

impl LoraLinear {
    /// A plain layer without LoRA.
    pub fn plain(base: Linear) -> Self {
        Self {
            base,
            sets: Vec::new(),
        }
    }

    /// Number of LoRA sets on this layer.
    pub fn sets(&self) -> usize {
        self.sets.len()
    }

    /// The layer with every set folded into its weight: `W + Σ (α/r) B A`; equal outputs
    /// at inference, no extra cost.
    pub fn merged(&self) -> Result<Linear> {
        let mut w = self.base.weight().clone();
        for s in &self.sets {
            w = (w + (s.b.matmul(&s.a)? * s.scale)?)?;
        }
        Ok(Linear::new(w, self.base.bias().cloned()))
    }

    /// [`Self::merged`] as a `LoraLinear` without sets.
    pub fn merge(&self) -> Result<Self> {
        Ok(Self::plain(self.merged()?))
    }
}

impl Module for LoraLinear {
    /// `x: [..., in] -> [..., out]`; each set's dropout applies inside a training
    /// [`crate::nn::Mode::run`].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.base.forward(x)?;
        for s in &self.sets {
            let h = crate::nn::dropout(x, s.dropout)?;
            // x A^T B^T, batched over the leading dims
            let low = h.broadcast_matmul(&s.a.t()?)?; // [..., r]
            y = (y + (low.broadcast_matmul(&s.b.t()?)? * s.scale)?)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn set(name: &str, rank: usize, targets: &[&str]) -> LoraConfig {
        LoraConfig {
            name: name.into(),
            rank,
            alpha: 8.0,
            dropout: 0.5,
            targets: targets.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn targets_match_whole_path_segments() {
        let c = set("s1", 2, &["q_proj", "self_attn.out_proj"]);
        assert!(c.matches("encoder.layers.0.self_attn.q_proj"));
        assert!(c.matches("q_proj"));
        assert!(!c.matches("encoder.layers.0.self_attn.xq_proj"));
        assert!(c.matches("layers.3.self_attn.out_proj"));
        assert!(!c.matches("layers.3.cross_attn.out_proj"));
    }

    #[test]
    fn stacked_sets_merge_into_the_base_and_start_as_identity() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let sets = [
            set("s1", 2, &["q_proj"]),
            set("s2", 3, &["q_proj", "v_proj"]),
        ];
        let q = linear(6, 5, vb.pp("attn").pp("q_proj"), &sets)?;
        let k = linear(6, 5, vb.pp("attn").pp("k_proj"), &sets)?;
        assert_eq!((q.sets(), k.sets()), (2, 0));
        let x = Tensor::randn(0f32, 1.0, (2, 4, 6), &dev)?;
        // B = 0: a fresh set changes nothing
        let plain = q.base.forward(&x)?;
        let diff = (q.forward(&x)? - &plain)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // give the sets non-zero B, then merged == unmerged
        for (name, var) in map.data().lock().unwrap().iter() {
            if name.contains("lora_B") {
                var.set(&Tensor::randn(0f32, 1.0, var.shape(), &dev)?)?;
            }
        }
        let q = linear(6, 5, vb.pp("attn").pp("q_proj"), &sets)?;
        let unmerged = q.forward(&x)?;
        let merged = q.merge()?;
        assert_eq!(merged.sets(), 0);
        let err = (&unmerged - merged.forward(&x)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let moved = (&unmerged - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            err < 1e-5 && moved > 0.1,
            "merge error {err}, LoRA effect {moved}"
        );
        // the keys are peft's
        let names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
        for k in [
            "attn.q_proj.lora_A.s1.weight",
            "attn.q_proj.lora_B.s2.weight",
            "attn.q_proj.weight",
        ] {
            assert!(names.iter().any(|n| n == k), "{k} not in {names:?}");
        }
        // dropout only in training (the forward above was outside any run), and gradients
        // reach A and B
        let train = crate::nn::Mode::Train { seed: 1 };
        let y = train.run(|| q.forward(&x))?;
        let diff = (&y - &unmerged)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff > 0.0, "training forward equals inference: no dropout");
        let grads = y.sqr()?.sum_all()?.backward()?;
        for (name, var) in map.data().lock().unwrap().iter() {
            if name.starts_with("attn.q_proj") {
                let g = grads.get(var).expect("gradient");
                assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
            }
        }
        Ok(())
    }
}
