//! CKD's networks (weakly supervised grounding by contrastive knowledge distillation,
//! Wang et al., CVPR 2021; `jhuang81/weak-sup-visual-grounding`, `nce_distill_model.py`):
//! the student that scores region-phrase pairs, and the small training-time detector.
//!
//! The student embeds proposals and phrases into one space: a region is RoIAlign on the
//! visual backbone's grid (bins flattened), then `FC -> ReLU -> FC` and L2 normalisation
//! (CKD: `2048 -> 1024 -> 512` on Faster R-CNN features); a phrase is the text encoder's
//! tokens max-pooled over its valid positions (CKD: an LSTM's hidden states over GloVe),
//! then `FC -> ReLU -> FC` and L2 normalisation. `s(r, p) = <e_r, e_p>`.
//! Only query-free backbones are allowed: a region's embedding must not depend on the phrase.
//!
//! The detector classifies a square crop around a box into the benchmark's object classes
//! plus background (the last logit). It exists only at training time; its weights live in
//! their own folder and never in a student checkpoint.

use crate::convnet::{ConvNet, ConvNetConfig};
use crate::grounder::{Mlp, TextConfig, TextEncoder, TextFeatures, VisualConfig, VisualEncoder};
use crate::nn;
use crate::roi_align::{roi_align, Roi, RoiAlignConfig};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CkdModelConfig {
    pub visual: VisualConfig,
    pub text: TextConfig,
    /// Square input side in pixels.
    pub image_size: usize,
    /// Tokens per phrase including the special tokens.
    pub max_phrase_len: usize,
    /// RoIAlign output side (bins are flattened into the region feature).
    pub roi: usize,
    pub hidden: usize,
    /// The joint embedding width (CKD: 512).
    pub embed_dim: usize,
}

impl CkdModelConfig {
    /// For the embedded benchmark: the demo grounder's conv net and 2-layer BERT, 2x2 RoI
    /// bins, embeddings of width 128.
    pub fn synth() -> Self {
        let g = crate::grounder::GrounderConfig::synth_small();
        Self {
            visual: g.visual,
            text: g.text,
            image_size: g.image_size,
            max_phrase_len: 10,
            roi: 2,
            hidden: 256,
            embed_dim: 128,
        }
    }

    /// For tests.
    pub fn tiny() -> Self {
        let g = crate::grounder::GrounderConfig::tiny();
        Self {
            visual: VisualConfig::ConvNet(ConvNetConfig::tiny()),
            text: g.text,
            image_size: 32,
            max_phrase_len: 8,
            roi: 2,
            hidden: 24,
            embed_dim: 16,
        }
    }

    fn visual_dim(&self) -> Result<usize> {
        match &self.visual {
            VisualConfig::ConvNet(c) => Ok(c.out_dim()),
            VisualConfig::ClipVit(c) => Ok(c.hidden_size),
            _ => candle_core::bail!(
                "CKD needs a query-free visual backbone (conv_net or clip_vit): region \
                 embeddings must not depend on the phrase"
            ),
        }
    }

    fn text_dim(&self) -> usize {
        match &self.text {
            TextConfig::Bert(c) => c.hidden_size,
            TextConfig::ClipText(c) => c.hidden_size,
        }
    }
}

/// CKD's student: region and phrase embeddings (see the module docs).
#[derive(Debug, Clone)]
pub struct CkdModel {
    visual: VisualEncoder,
    text: TextEncoder,
    region: Mlp,
    phrase: Mlp,
    cfg: CkdModelConfig,
}

impl CkdModel {
    /// Parameters: `visual.*`, `text.*` (the grounder's names), `ckd.region.*`, `ckd.phrase.*`.
    pub fn new(vb: VarBuilder, cfg: &CkdModelConfig) -> Result<Self> {
        let cv = cfg.visual_dim()?;
        Ok(Self {
            visual: VisualEncoder::new(vb.pp("visual"), &cfg.visual)?,
            text: TextEncoder::new(vb.pp("text"), &cfg.text)?,
            region: Mlp::new(
                vb.pp("ckd.region"),
                &[cv * cfg.roi * cfg.roi, cfg.hidden, cfg.embed_dim],
            )?,
            phrase: Mlp::new(
                vb.pp("ckd.phrase"),
                &[cfg.text_dim(), cfg.hidden, cfg.embed_dim],
            )?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &CkdModelConfig {
        &self.cfg
    }

    /// `pixels: [B, 3, S, S]`, `pixel_mask: [B, S, S]`, `rois` in input pixels (any
    /// number per image) -> `[R, E]` unit-norm region embeddings in the order of `rois`.
    pub fn regions(&self, pixels: &Tensor, pixel_mask: &Tensor, rois: &[Roi]) -> Result<Tensor> {
        // The backbones allowed here ignore the text: an empty placeholder.
        let b = pixels.dim(0)?;
        let none = Tensor::zeros((b, 0), DType::F32, pixels.device())?;
        let text = TextFeatures {
            tokens: none.clone(),
            pooled: none.clone(),
            hidden_states: Vec::new(),
            projected: None,
        };
        let v = self.visual.forward(pixels, pixel_mask, &text, &none)?;
        let (gh, gw) = v.grid;
        let n = v.tokens.dim(1)?;
        let grid = v.tokens.narrow(1, n - gh * gw, gh * gw)?; // drop a CLS token: [B, gh*gw, C]
        let cfg = RoiAlignConfig {
            output: (self.cfg.roi, self.cfg.roi),
            spatial_scale: gw as f32 / self.cfg.image_size as f32,
            sampling_ratio: 2,
            aligned: true,
        };
        let pooled = roi_align(&grid, (gh, gw), rois, &cfg)?; // [R, bins, C]
        let r = pooled.dim(0)?;
        let flat = pooled.reshape((r, ()))?;
        nn::l2_normalize(&self.region.forward(&flat)?)
    }

    /// `ids, mask: [N, Lp]` one phrase per row -> `[N, E]` unit-norm phrase embeddings.
    pub fn phrases(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let t = self.text.forward(ids, mask)?.tokens; // [N, Lp, Ct]
                                                      // max over valid positions: padding pushed far below
        let off = ((mask.to_dtype(t.dtype())? - 1.0)? * 1e4)?.unsqueeze(D::Minus1)?;
        let pooled = t.broadcast_add(&off)?.max(1)?; // [N, Ct]
        nn::l2_normalize(&self.phrase.forward(&pooled)?)
    }
}

/// The training-time detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    pub net: ConvNetConfig,
    /// Object classes (background is one more logit, the last).
    pub classes: usize,
}

impl DetectorConfig {
    /// 32 px crops, a 3-stage conv net of width 16-64.
    pub fn small(classes: usize) -> Self {
        Self {
            net: ConvNetConfig {
                channels: vec![16, 32, 64],
                depths: vec![1, 1, 1],
                patch_size: 2,
                image_size: 32,
                layer_norm_eps: 1e-5,
            },
            classes,
        }
    }
}

/// Crop classifier: conv net, mean over the grid, linear to `classes + 1` logits.
#[derive(Debug, Clone)]
pub struct Detector {
    net: ConvNet,
    head: candle_nn::Linear,
}

impl Detector {
    pub fn new(vb: VarBuilder, cfg: &DetectorConfig) -> Result<Self> {
        Ok(Self {
            net: ConvNet::new(vb.pp("net"), &cfg.net)?,
            head: candle_nn::linear(cfg.net.out_dim(), cfg.classes + 1, vb.pp("head"))?,
        })
    }

    /// `crops: [N, 3, s, s]` -> logits `[N, classes + 1]`.
    pub fn forward(&self, crops: &Tensor) -> Result<Tensor> {
        let t = self.net.forward(crops)?.tokens; // [N, g*g, C]
        self.head.forward(&t.mean(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn embeddings_are_unit_norm_and_padding_free() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = CkdModelConfig::tiny();
        let m = CkdModel::new(vb, &cfg)?;
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
        let mask = Tensor::ones((2, 32, 32), DType::F32, &dev)?;
        let rois = [
            Roi {
                batch: 0,
                xyxy: [0.0, 0.0, 16.0, 16.0],
            },
            Roi {
                batch: 1,
                xyxy: [4.0, 8.0, 30.0, 31.0],
            },
            Roi {
                batch: 0,
                xyxy: [10.0, 2.0, 20.0, 12.0],
            },
        ];
        let r = m.regions(&pixels, &mask, &rois)?;
        assert_eq!(r.dims(), &[3, 16]);
        let norms = r.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
        // a phrase's embedding does not depend on its padding ids
        let ids = Tensor::new(&[[1u32, 5, 6, 2, 0, 0], [1, 5, 6, 2, 9, 9]], &dev)?;
        let pm = Tensor::new(
            &[[1f32, 1., 1., 1., 0., 0.], [1., 1., 1., 1., 0., 0.]],
            &dev,
        )?;
        let p = m.phrases(&ids, &pm)?;
        let d = (p.get(0)? - p.get(1)?)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn query_aware_backbones_are_refused() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = CkdModelConfig {
            visual: crate::grounder::GrounderConfig::qrnet_synth().visual,
            ..CkdModelConfig::tiny()
        };
        let err = CkdModel::new(vb, &cfg).unwrap_err().to_string();
        assert!(err.contains("query-free"), "{err}");
    }

    #[test]
    fn detector_gives_one_logit_per_class_and_background() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let d = Detector::new(vb, &DetectorConfig::small(5))?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &dev)?)?;
        assert_eq!(d.forward(&x)?.dims(), &[3, 6]);
        Ok(())
    }
}
