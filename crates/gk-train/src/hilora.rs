//! HiVG's hierarchical LoRA (HiLoRA, `shared/methods.md` §3.2): training in stages, each
//! an ordinary run under `<out>/stage{k}` that starts from the best checkpoint of the one
//! before.
//!
//! - Stage 0 (warm-up): LoRA set `s0` is attached to the CLIP towers and frozen; the
//!   bridges, the multi-level projection and everything outside CLIP train.
//! - Stage k >= 1: a new set `sk` is stacked on the frozen earlier ones; it trains in the
//!   vision layers below `vision_layers` (shallow to deep as k grows) and in the text tower,
//!   with the bridges and the rest; CLIP's own weights stay frozen.
//!
//! Which parameters train is only a list of optimiser groups ([`hilora_groups`]), so a stage
//! config written to its run directory says exactly what it trained.

use crate::error::{Result, TrainError};
use crate::optim::ParamGroup;
use crate::train::{PretrainedConfig, RunConfig};
use gk_models::grounder::{TextConfig, VisualConfig};
use gk_models::lora::LoraConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One HiLoRA stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiLoraStage {
    pub epochs: usize,
    pub lr: f64,
    /// The new set trains in vision layers `0..vision_layers` (0 at the warm-up).
    pub vision_layers: usize,
}

/// The LoRA sets' shape and the stages (`[hilora]` in a run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiLoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on every set's input in training (HiVG: 0.1; seeded, `gk_models::nn::dropout`).
    #[serde(default)]
    pub dropout: f32,
    pub targets: Vec<String>,
    pub stages: Vec<HiLoraStage>,
}

impl HiLoraConfig {
    /// HiVG-B/16 on RefCOCO: rank 32, α 16 on the attention projections; warm-up 60 epochs
    /// at 2.5e-4, then 20 epochs each at 1e-4, 5e-5, 2.5e-5 over layers 0-4, 0-7, 0-11.
    pub fn hivg_b16() -> Self {
        let base = LoraConfig::hivg("s0");
        let stage = |epochs, lr, vision_layers| HiLoraStage {
            epochs,
            lr,
            vision_layers,
        };
        Self {
            rank: base.rank,
            alpha: base.alpha,
            dropout: base.dropout,
            targets: base.targets,
            stages: vec![
                stage(60, 2.5e-4, 0),
                stage(20, 1e-4, 5),
                stage(20, 5e-5, 8),
                stage(20, 2.5e-5, 12),
            ],
        }
    }

    /// The LoRA sets present at stage `k`: `s0..=sk`.
    pub fn sets(&self, k: usize) -> Vec<LoraConfig> {
        (0..=k)
            .map(|i| LoraConfig {
                name: format!("s{i}"),
                rank: self.rank,
                alpha: self.alpha,
                dropout: self.dropout,
                targets: self.targets.clone(),
            })
            .collect()
    }
}

/// The optimiser groups of stage `k` (first match wins): set `sk` in vision layers
/// `0..vision_layers` and in the text tower, the bridges and the multi-level norms and
/// projection train; the rest of `visual.*` and `text.*` (CLIP and earlier sets) is frozen;
/// everything else (fusion, head) trains.
pub fn hilora_groups(k: usize, vision_layers: usize) -> Vec<ParamGroup> {
    let g = |prefix: String, lr_scale: f64| ParamGroup { prefix, lr_scale };
    let mut groups = Vec::new();
    if k > 0 {
        for l in 0..vision_layers {
            groups.push(g(format!("visual.encoder.layers.{l}.*.lora_*.s{k}."), 1.0));
        }
        groups.push(g(format!("text.*.lora_*.s{k}."), 1.0));
    }
    groups.push(g("visual.bridge.".into(), 1.0));
    groups.push(g("visual.ml_norm.".into(), 1.0));
    groups.push(g("visual.ml_visual_projection.".into(), 1.0));
    groups.push(g("visual.".into(), 0.0));
    groups.push(g("text.".into(), 0.0));
    // CLIP's projections and logit scale (the contrastive term) stay frozen with CLIP
    for p in ["visual_projection.", "text_projection.", "logit_scale"] {
        groups.push(g(p.into(), 0.0));
    }
    groups
}

/// The run config of stage `k` of `base` (whose `hilora` must be set and whose visual
/// encoder must be HiVG's): the sets `s0..=sk` on both CLIP towers, the stage's epochs,
/// LR and groups (before the base's own), and its starting weights: the base's
/// `pretrained` at the warm-up, else `previous_best` (loaded non-strictly: the new set is
/// not in it).
pub fn stage_config(base: &RunConfig, k: usize, previous_best: Option<&Path>) -> Result<RunConfig> {
    let h = base
        .hilora
        .as_ref()
        .ok_or_else(|| TrainError::Config("the run config has no [hilora] stages".into()))?;
    let stage = h.stages.get(k).ok_or_else(|| {
        TrainError::Config(format!("stage {k}: [hilora] has {} stages", h.stages.len()))
    })?;
    let mut cfg = base.clone();
    cfg.hilora = None;
    let sets = h.sets(k);
    match &mut cfg.model.visual {
        VisualConfig::Hivg(v) => v.vision.lora = sets.clone(),
        _ => {
            return Err(TrainError::Config(
                "HiLoRA stages need HiVG's visual encoder ([model.visual] kind = \"hivg\")".into(),
            ))
        }
    }
    if let TextConfig::ClipText(t) = &mut cfg.model.text {
        t.lora = sets;
    }
    cfg.optim.epochs = stage.epochs;
    cfg.optim.lr = stage.lr;
    cfg.optim.groups = hilora_groups(k, stage.vision_layers)
        .into_iter()
        .chain(base.optim.groups.iter().cloned())
        .collect();
    if k > 0 {
        let prev = previous_best.ok_or_else(|| {
            TrainError::Config(format!(
                "stage {k} starts from stage {}'s best checkpoint",
                k - 1
            ))
        })?;
        if !prev.is_file() {
            return Err(TrainError::Config(format!(
                "stage {k} starts from {}, which does not exist: train stage {} first",
                prev.display(),
                k - 1
            )));
        }
        cfg.pretrained = vec![PretrainedConfig {
            file: prev.to_path_buf(),
            from: String::new(),
            to: String::new(),
            strict: false,
            format: Default::default(),
        }];
        // the previous stage's positions are in its checkpoint
        cfg.sincos_positions = false;
    }
    Ok(cfg)
}

/// Trains the stages of `base` under `out/stage{k}` in order (or only stage `only`, whose
/// predecessor must have finished): finished stages are kept, interrupted ones resumed.
/// Returns `(stage, best val Acc@0.5)` of each stage run or found.
pub fn train_stages(
    out: &Path,
    base: &RunConfig,
    only: Option<usize>,
    opts: &crate::train::TrainOptions,
) -> Result<Vec<(usize, f64)>> {
    use crate::run::RunDir;
    let n = base.hilora.as_ref().map_or(0, |h| h.stages.len());
    if n == 0 {
        return Err(TrainError::Config(
            "the run config has no [hilora] stages".into(),
        ));
    }
    let stages: Vec<usize> = match only {
        Some(k) if k >= n => {
            return Err(TrainError::Config(format!(
                "--stage {k}: there are {n} stages (0..{n})"
            )))
        }
        Some(k) => vec![k],
        None => (0..n).collect(),
    };
    let mut done = Vec::new();
    for k in stages {
        let dir = out.join(format!("stage{k}"));
        let prev = (k > 0).then(|| out.join(format!("stage{}", k - 1)).join("best.safetensors"));
        let run = if dir.join("config.toml").is_file() {
            RunDir::open(&dir)?
        } else {
            crate::train::prepare(&dir, stage_config(base, k, prev.as_deref())?)?
        };
        let (state, _) = crate::train::train(&run, opts)?;
        done.push((k, state.best_acc));
        if opts.stop_after.is_some() && !state.finished {
            break;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::glob_prefix;

    fn scale(groups: &[ParamGroup], name: &str) -> f64 {
        groups
            .iter()
            .find(|g| glob_prefix(&g.prefix, name))
            .map_or(1.0, |g| g.lr_scale)
    }

    #[test]
    fn stage_groups_train_the_new_set_in_the_chosen_layers_only() {
        let g = hilora_groups(2, 8);
        let lora = |layer: usize, set: usize| {
            format!("visual.encoder.layers.{layer}.self_attn.v_proj.lora_B.s{set}.weight")
        };
        assert_eq!(scale(&g, &lora(7, 2)), 1.0);
        assert_eq!(scale(&g, &lora(8, 2)), 0.0, "layer 8 is beyond stage 2");
        assert_eq!(scale(&g, &lora(0, 1)), 0.0, "earlier sets are frozen");
        assert_eq!(
            scale(&g, "visual.encoder.layers.0.self_attn.q_proj.weight"),
            0.0
        );
        assert_eq!(
            scale(&g, "text.encoder.layers.2.mlp.fc1.lora_A.s2.weight"),
            1.0
        );
        assert_eq!(
            scale(&g, "text.encoder.layers.2.self_attn.q_proj.weight"),
            0.0
        );
        assert_eq!(scale(&g, "visual.bridge.0.gate.weight"), 1.0);
        for clip in [
            "visual_projection.weight",
            "text_projection.weight",
            "logit_scale",
        ] {
            assert_eq!(scale(&g, clip), 0.0, "{clip} is CLIP's");
        }
        assert_eq!(scale(&g, "vl_transformer.layers.0.linear1.weight"), 1.0);
        let warm = hilora_groups(0, 0);
        assert_eq!(
            scale(&warm, &lora(0, 0)),
            0.0,
            "s0 is frozen at the warm-up"
        );
        assert_eq!(
            scale(&warm, "visual.bridge.1.cross_attn.q_proj.weight"),
            1.0
        );
    }
}
