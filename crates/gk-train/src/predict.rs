//! Prediction: one image and one expression in, a pixel box out. Uses the run's saved
//! tokenizer and the eval transform, so it sees exactly what evaluation sees.

use crate::error::Result;
use crate::run::RunDir;
use crate::train::{load_inference, Loaded};
use candle_core::{Device, Tensor};
use gk_box::Box4;
use gk_data::transforms::{self, TransformConfig};
use image::RgbImage;
use rand::SeedableRng;

/// A trained grounder ready to answer queries.
pub struct Predictor {
    loaded: Loaded,
    transform: TransformConfig,
    dev: Device,
}

/// One answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Grounding {
    /// Pixel xyxy in the input image.
    pub bbox_xyxy: Box4,
    /// Normalised cxcywh in the model's padded square frame.
    pub model_cxcywh: Box4,
    /// The expression was cut to the model's text length.
    pub truncated: bool,
}

impl Predictor {
    /// Loads `best.safetensors` (or `model.safetensors` when there is no best yet).
    pub fn open(run: &RunDir) -> Result<Self> {
        let dev = Device::Cpu;
        let weights = if run.file("best.safetensors").is_file() {
            "best.safetensors"
        } else {
            "model.safetensors"
        };
        let mut loaded = load_inference(run, weights, &dev)?;
        // LoRA (HiLoRA stages) folded into the weights: plain-model cost at inference
        loaded.model = loaded.model.merge_lora()?;
        let transform = TransformConfig {
            side: loaded.cfg.model.image_size as u32,
            ..loaded.cfg.optim.augment.clone()
        };
        Ok(Self {
            loaded,
            transform,
            dev,
        })
    }

    pub fn image_size(&self) -> u32 {
        self.transform.side
    }

    /// Grounds `expr` in `image`. An empty expression is an error.
    pub fn predict(&self, image: &RgbImage, expr: &str) -> Result<Grounding> {
        let (w, h) = image.dimensions();
        let sample = gk_data::dataset::Sample {
            image: image.clone(),
            expr: expr.to_string(),
            bbox: [0.0, 0.0, w as f32, h as f32],
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0); // unused by the eval transform
        let p = transforms::apply(sample, &self.transform, false, &mut rng, &self.dev)?;
        let (ids, mask, truncated) = encode_one(
            &self.loaded.tok,
            expr,
            self.loaded.cfg.model.max_text_len,
            &self.dev,
        )?;
        let out = self.loaded.model.forward(
            &p.pixels.unsqueeze(0)?,
            &p.mask.unsqueeze(0)?,
            &ids,
            &mask,
            gk_models::nn::Mode::Eval,
        )?;
        let b = out.pred_box.squeeze(0)?.to_vec1::<f32>()?;
        let model_cxcywh = [b[0], b[1], b[2], b[3]];
        let px = p.frame.to_image(model_cxcywh);
        let bbox_xyxy = [
            px[0].clamp(0.0, w as f32),
            px[1].clamp(0.0, h as f32),
            px[2].clamp(0.0, w as f32),
            px[3].clamp(0.0, h as f32),
        ];
        Ok(Grounding {
            bbox_xyxy,
            model_cxcywh,
            truncated,
        })
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
