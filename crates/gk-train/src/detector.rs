//! CKD's training-time detector: trained on a benchmark's object labels (`objects.jsonl` +
//! `labels.json`), it gives class posteriors for region proposals; the weakly supervised
//! student distils them and never sees a box label. A detector folder holds
//! `detector.safetensors` and `detector.json`; student runs only name it, and prediction
//! never opens it.
//!
//! Training samples per image: every labelled object box (its class), every proposal
//! whose best IoU with an object is at least `pos_iou` (that object's class) and every
//! proposal below `neg_iou` with all objects (background, the last class). A sample is a
//! square crop around the box with a quarter of margin (`teacher::region_crop`), resized
//! to `crop` pixels.

use crate::error::{io_err, Result, TrainError};
use crate::init::seeded_var_builder;
use crate::optim::{lr_factor, AdamW, Schedule};
use crate::teacher::{read_jsonl, region_crop};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use gk_box::Box4;
use gk_data::image_io::{self, Normalize};
use gk_data::phrases::Labels;
use gk_data::proposals::{propose, ProposalConfig};
use gk_models::ckd::{Detector, DetectorConfig};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the detector is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorTrainConfig {
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub pos_iou: f32,
    pub neg_iou: f32,
    pub proposals: ProposalConfig,
}

impl Default for DetectorTrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            epochs: 2,
            batch_size: 128,
            lr: 2e-3,
            weight_decay: 1e-4,
            pos_iou: 0.5,
            neg_iou: 0.3,
            proposals: ProposalConfig::default(),
        }
    }
}

/// `detector.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorMeta {
    pub model: DetectorConfig,
    pub labels: Labels,
    pub norm: Normalize,
    pub train: DetectorTrainConfig,
    /// Class accuracy on the validation split's object boxes and the proposals matched to them.
    pub val_object_accuracy: f64,
    /// Accuracy over all validation samples (objects, matched and background proposals).
    pub val_accuracy: f64,
}

/// A trained detector.
pub struct TrainedDetector {
    net: Detector,
    pub meta: DetectorMeta,
    dev: Device,
}

/// `[3, s, s]` crop of `b` in `image`, as the detector sees it.
fn crop_image(image: &RgbImage, b: Box4, side: u32) -> RgbImage {
    image::imageops::resize(
        &region_crop(image, b),
        side,
        side,
        image::imageops::FilterType::Triangle,
    )
}

fn crops_tensor(crops: &[&RgbImage], norm: &Normalize, dev: &Device) -> Result<Tensor> {
    let t = crops
        .iter()
        .map(|c| image_io::to_tensor(c, norm, dev))
        .collect::<gk_data::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&t, 0)?)
}

impl TrainedDetector {
    pub fn open(dir: &Path, dev: &Device) -> Result<Self> {
        let p = dir.join("detector.json");
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        let meta: DetectorMeta = serde_json::from_str(&text).map_err(|e| TrainError::Format {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        if meta.model.classes != meta.labels.classes.len() {
            return Err(TrainError::Format {
                path: p,
                msg: format!(
                    "{} classes in the model, {} labels",
                    meta.model.classes,
                    meta.labels.classes.len()
                ),
            });
        }
        let map = VarMap::new();
        let net = Detector::new(seeded_var_builder(&map, 0, dev), &meta.model)?;
        crate::weights::load_prefixed(&map, &dir.join("detector.safetensors"), &[("", "")], true)?;
        Ok(Self {
            net,
            meta,
            dev: dev.clone(),
        })
    }

    /// Class posteriors `[len(boxes)][classes + 1]` (softmax; background last).
    pub fn posteriors(&self, image: &RgbImage, boxes: &[Box4]) -> Result<Vec<Vec<f32>>> {
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let side = self.meta.model.net.image_size as u32;
        let crops: Vec<RgbImage> = boxes.iter().map(|&b| crop_image(image, b, side)).collect();
        let refs: Vec<&RgbImage> = crops.iter().collect();
        let logits = self
            .net
            .forward(&crops_tensor(&refs, &self.meta.norm, &self.dev)?)?;
        Ok(candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?)
    }
}

/// Labelled objects of one image of `objects.jsonl`.
struct ImageObjects {
    image: String,
    objects: Vec<(usize, Box4)>,
}

fn read_objects(data: &Path, labels: &Labels, split: &str) -> Result<Vec<ImageObjects>> {
    let path = data.join("objects.jsonl");
    let mut out = Vec::new();
    for (line, row) in read_jsonl(&path)?.into_iter().enumerate() {
        if row["split"].as_str() != Some(split) {
            continue;
        }
        let image = row["image"].as_str().ok_or_else(|| TrainError::Format {
            path: path.clone(),
            msg: format!("line {}: no image", line + 1),
        })?;
        let mut objects = Vec::new();
        for o in row["objects"].as_array().into_iter().flatten() {
            let class = o[labels.field.as_str()]
                .as_str()
                .and_then(|n| labels.index(n));
            let b: Vec<f32> = o["bbox_xyxy"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_f64().map(|v| v as f32))
                .collect();
            if let (Some(c), Ok(b)) = (class, <[f32; 4]>::try_from(b)) {
                if b[2] > b[0] && b[3] > b[1] {
                    objects.push((c, b));
                }
            }
        }
        out.push(ImageObjects {
            image: image.to_string(),
            objects,
        });
    }
    Ok(out)
}

/// Crops and labels of `images` (see the module docs).
fn samples(
    data: &Path,
    images: &[ImageObjects],
    cfg: &DetectorTrainConfig,
    side: u32,
    background: usize,
) -> Result<(Vec<RgbImage>, Vec<u32>)> {
    let (mut crops, mut labels) = (Vec::new(), Vec::new());
    for im in images {
        let img = image_io::load_rgb(&data.join(&im.image))?;
        for &(c, b) in &im.objects {
            crops.push(crop_image(&img, b, side));
            labels.push(c as u32);
        }
        for p in propose(&img, &cfg.proposals) {
            let best = im
                .objects
                .iter()
                .map(|&(c, b)| (gk_box::iou(p, b).unwrap_or(0.0), c))
                .fold((0.0f32, background), |a, x| if x.0 > a.0 { x } else { a });
            let label = if best.0 >= cfg.pos_iou {
                best.1
            } else if best.0 < cfg.neg_iou {
                background
            } else {
                continue;
            };
            crops.push(crop_image(&img, p, side));
            labels.push(label as u32);
        }
    }
    Ok((crops, labels))
}

/// Trains a detector on the `train` split of a benchmark folder (`objects.jsonl`,
/// `labels.json`) and writes it to `out`; reports accuracy on the `val` split.
/// `progress(step, total, loss)` after every step.
pub fn train_detector(
    data: &Path,
    out: &Path,
    cfg: &DetectorTrainConfig,
    mut progress: impl FnMut(usize, usize, f32),
) -> Result<DetectorMeta> {
    let dev = Device::Cpu;
    let labels = Labels::load(&data.join("labels.json"))?;
    let model = DetectorConfig::small(labels.classes.len());
    let side = model.net.image_size as u32;
    let background = labels.classes.len();
    let norm = Normalize::IMAGENET;
    let (crops, targets) = samples(
        data,
        &read_objects(data, &labels, "train")?,
        cfg,
        side,
        background,
    )?;
    if crops.len() < cfg.batch_size {
        return Err(TrainError::Config(format!(
            "{} detector samples, fewer than one batch of {}",
            crops.len(),
            cfg.batch_size
        )));
    }
    let map = VarMap::new();
    let net = Detector::new(seeded_var_builder(&map, cfg.seed, &dev), &model)?;
    let mut opt = AdamW::new(&map, &[], cfg.weight_decay)?;
    let per_epoch = crops.len() / cfg.batch_size;
    let total = per_epoch * cfg.epochs;
    let mut order: Vec<usize> = (0..crops.len()).collect();
    let mut step = 0;
    for epoch in 0..cfg.epochs {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ (epoch as u64 + 1));
        order.shuffle(&mut rng);
        for chunk in order.chunks_exact(cfg.batch_size) {
            let x = crops_tensor(
                &chunk.iter().map(|&i| &crops[i]).collect::<Vec<_>>(),
                &norm,
                &dev,
            )?;
            let y = Tensor::new(chunk.iter().map(|&i| targets[i]).collect::<Vec<_>>(), &dev)?;
            let loss = candle_nn::loss::cross_entropy(&net.forward(&x)?, &y)?;
            let v = loss.to_scalar::<f32>()?;
            if !v.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    parts: format!("detector cross-entropy {v}"),
                });
            }
            let grads = loss.backward()?;
            let lr = cfg.lr * lr_factor(Schedule::Cosine { min_ratio: 0.05 }, step, total, 50);
            opt.step(&grads, lr)?;
            step += 1;
            progress(step, total, v);
        }
    }
    // validation
    let val = read_objects(data, &labels, "val")?;
    let (vcrops, vtargets) = samples(data, &val, cfg, side, background)?;
    let (mut right, mut obj_right, mut obj_total) = (0usize, 0usize, 0usize);
    for (chunk, ys) in vcrops.chunks(256).zip(vtargets.chunks(256)) {
        let logits = net.forward(&crops_tensor(
            &chunk.iter().collect::<Vec<_>>(),
            &norm,
            &dev,
        )?)?;
        let pred = logits
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        for (p, y) in pred.iter().zip(ys) {
            right += (p == y) as usize;
            if (*y as usize) < background {
                obj_total += 1;
                obj_right += (p == y) as usize;
            }
        }
    }
    let meta = DetectorMeta {
        model,
        labels,
        norm,
        train: cfg.clone(),
        val_object_accuracy: 100.0 * obj_right as f64 / obj_total.max(1) as f64,
        val_accuracy: 100.0 * right as f64 / vcrops.len().max(1) as f64,
    };
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    crate::weights::save_atomic(&map, &out.join("detector.safetensors"))?;
    let text =
        serde_json::to_string_pretty(&meta).map_err(|e| TrainError::Config(e.to_string()))?;
    crate::weights::write_atomic(&out.join("detector.json"), text.as_bytes())?;
    Ok(meta)
}
