//! The grounder run kinds behind [`crate::infer::GroundingModel`]: a run's model built
//! directly from its saved weights (no random initialisation, no autograd variables, LoRA
//! folded in), its eval transform (the model kind's resize, normalisation and centred
//! letterbox) and its tokenizer, so prediction sees exactly what evaluation sees.

use crate::error::{Result, TrainError};
use crate::infer::{Answer, GroundingModel, ModelInfo, Query};
use crate::run::RunDir;
use crate::train::RunConfig;
use candle_core::{DType, Device, Tensor};
use gk_data::tokenize::TextTokenizer;
use gk_data::transforms::{self, TransformConfig};
use gk_models::grounder::{Grounder, GrounderConfig, VisualConfig};
use gk_models::hivg::BridgeMode;
use rand::SeedableRng;

/// A trained grounder ready to answer queries.
pub struct Predictor {
    cfg: RunConfig,
    model: Grounder,
    tok: TextTokenizer,
    transform: TransformConfig,
    info: ModelInfo,
    dev: Device,
}

/// The name of a grounder's kind, from its visual backbone.
pub fn kind_name(cfg: &GrounderConfig) -> &'static str {
    match &cfg.visual {
        VisualConfig::ClipVit(_) => "clip",
        VisualConfig::ConvNet(_) => "conv",
        VisualConfig::QrNet(_) => "qrnet",
        VisualConfig::Hivg(h) if h.bridge_layers.is_empty() => "clip-vg",
        VisualConfig::Hivg(_) => "hivg",
        VisualConfig::Detr(_) => "transvg",
    }
}

/// Builds `cfg` from the tensors of `path` (for inference: plain tensors, nothing drawn)
/// and counts the file's values. A tensor the model needs and the file lacks, or one of
/// the wrong shape, is an error naming the file.
pub fn model_from_file(
    path: &std::path::Path,
    cfg: &GrounderConfig,
    dev: &Device,
) -> Result<(Grounder, usize)> {
    let tensors = crate::weights::read_safetensors(path, dev)?;
    let count = tensors.values().map(|t| t.elem_count()).sum();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, dev);
    let model = Grounder::new(vb, cfg).map_err(|e| TrainError::Format {
        path: path.to_path_buf(),
        msg: format!("does not fit the run's model: {e}"),
    })?;
    Ok((model, count))
}

impl Predictor {
    /// Loads the run's serving weights ([`crate::infer::serving_weights`]).
    pub fn open(run: &RunDir) -> Result<Self> {
        let dev = Device::Cpu;
        let cfg: RunConfig = run.load_config()?;
        let tok = TextTokenizer::from_file(&run.file("tokenizer.json"))?
            .with_pad_override(cfg.model.layout.pad_id);
        let weights = run.file(crate::infer::serving_weights(run));
        // LoRA (HiLoRA stages) folded into the weights: plain-model cost at inference
        let (model, parameters) = model_from_file(&weights, &cfg.model, &dev)?;
        let model = model.merge_lora()?;
        let transform = TransformConfig {
            side: cfg.model.image_size as u32,
            ..cfg.optim.augment.clone()
        };
        let info = ModelInfo {
            kind: kind_name(&cfg.model).to_string(),
            run: run.path().to_path_buf(),
            weights,
            image_size: transform.side,
            max_text_len: cfg.model.max_text_len,
            parameters,
            batch_dependent: match &cfg.model.visual {
                VisualConfig::Hivg(h) if h.bridge_mode == BridgeMode::Batched => {
                    Some("HiVG's batch-mixing bridges (bridge_mode = batched)".into())
                }
                _ => None,
            },
            data: cfg.data.clone(),
        };
        Ok(Self {
            cfg,
            model,
            tok,
            transform,
            info,
            dev,
        })
    }

    pub fn image_size(&self) -> u32 {
        self.transform.side
    }
}

impl GroundingModel for Predictor {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn ground(&self, queries: &[Query<'_>]) -> Result<Vec<Answer>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let len = self.cfg.model.max_text_len;
        let (mut pixels, mut masks, mut frames, mut ids, mut text_mask, mut cut) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for q in queries {
            let (w, h) = q.image.dimensions();
            let sample = gk_data::dataset::Sample {
                image: q.image.clone(),
                expr: q.expr.to_string(),
                bbox: [0.0, 0.0, w as f32, h as f32],
            };
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0); // unused by the eval transform
            let p = transforms::apply(sample, &self.transform, false, &mut rng, &self.dev)?;
            let enc = self.tok.encode(q.expr, len)?;
            pixels.push(p.pixels);
            masks.push(p.mask);
            frames.push(p.frame);
            ids.extend(enc.ids);
            text_mask.extend(enc.mask.iter().map(|&m| m as f32));
            cut.push(enc.truncated);
        }
        let b = queries.len();
        let out = self.model.forward(
            &Tensor::stack(&pixels, 0)?,
            &Tensor::stack(&masks, 0)?,
            &Tensor::from_vec(ids, (b, len), &self.dev)?,
            &Tensor::from_vec(text_mask, (b, len), &self.dev)?,
            gk_models::nn::Mode::Eval,
        )?;
        let boxes = out.pred_box.to_vec2::<f32>()?;
        let scores = match &out.token_probs {
            // the dense head's winning cell probability
            Some(p) if out.cells.is_some() => Some(p.max(1)?.to_vec1::<f32>()?),
            _ => None,
        };
        Ok(queries
            .iter()
            .enumerate()
            .map(|(k, q)| {
                let (w, h) = q.image.dimensions();
                let b = &boxes[k];
                let mut a = Answer::from_model_box([b[0], b[1], b[2], b[3]], frames[k], w, h);
                a.truncated = cut[k];
                a.score = scores.as_ref().map(|s| s[k]);
                a
            })
            .collect())
    }
}

/// One text as a batch of one: ids `[1, L]`, mask `[1, L]` (f32) and whether it was cut.
pub fn encode_one(
    tok: &gk_data::tokenize::TextTokenizer,
    text: &str,
    max_len: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor, bool)> {
    let enc = tok.encode(text, max_len)?;
    let mask: Vec<f32> = enc.mask.iter().map(|&m| m as f32).collect();
    Ok((
        Tensor::new(enc.ids.as_slice(), dev)?.unsqueeze(0)?,
        Tensor::new(mask.as_slice(), dev)?.unsqueeze(0)?,
        enc.truncated,
    ))
}
