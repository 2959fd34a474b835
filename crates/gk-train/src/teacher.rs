//! The frozen CLIP-style teacher of the distillation methods (issue 4), and its
//! pretraining on the benchmark's image-caption pairs.
//!
//! A teacher is a folder in the Hugging Face CLIP layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`), so a real CLIP and one made by [`pretrain`]
//! load the same way; an optional `teacher.json` holds the preprocessing of ours and its
//! retrieval scores. [`Teacher`] gives L2-normalised image, region (square crops) and text
//! embeddings, and an id (sha256 of the weights) that names it in feature caches.
//!
//! [`pretrain`] trains a small CLIP from scratch with CLIP's symmetric InfoNCE and a
//! learned temperature on the benchmark's scene captions (`captions.jsonl`) and on object
//! crops described by their labels (`objects.jsonl`), then reports zero-shot retrieval
//! R@1/R@5 on the validation split.

use crate::distill::{
    apply_offset, info_nce, mirror, sla_offsets, Offset, SlaBatch, TeacherBatch, SLA_CANDIDATES,
};
use crate::error::{io_err, Result, TrainError};
use crate::init::seeded_var_builder;
use crate::optim::{lr_factor, AdamW, Schedule};
use crate::weights::{read_safetensors, save_atomic, write_atomic};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gk_box::Box4;
use gk_data::image_io::{self, Normalize};
use gk_data::tokenize::{self, TextTokenizer};
use gk_models::clip::{ClipConfig, ClipModel, ClipTextConfig, ClipVisionConfig};
use gk_models::nn::{l2_normalize, Activation};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Preprocessing and scores of a teacher we trained (`teacher.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherMeta {
    pub image_size: usize,
    pub max_text_len: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    #[serde(default)]
    pub retrieval: Option<RetrievalReport>,
}

/// The `config.json` of a teacher folder.
pub fn read_config(dir: &Path) -> Result<ClipConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Format {
        path,
        msg: format!("not a CLIP config: {e}"),
    })
}

/// A frozen CLIP-style dual encoder.
pub struct Teacher {
    pub model: ClipModel,
    pub tok: TextTokenizer,
    pub cfg: ClipConfig,
    /// sha256 of `model.safetensors`: feature caches are keyed by it.
    pub id: String,
    /// Embedding size (`projection_dim`).
    pub dim: usize,
    pub meta: TeacherMeta,
    dev: Device,
}

impl std::fmt::Debug for Teacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teacher")
            .field("id", &self.id)
            .field("dim", &self.dim)
            .finish()
    }
}

/// Images or texts per forward pass when embedding many.
const CHUNK: usize = 64;

impl Teacher {
    /// Loads a teacher folder (a Hugging Face CLIP folder, or one written by [`pretrain`]).
    pub fn open(dir: &Path, dev: &Device) -> Result<Self> {
        let cfg = read_config(dir)?;
        let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        if tok.vocab_size() > cfg.text_config.vocab_size {
            return Err(TrainError::Config(format!(
                "teacher {}: its tokenizer has {} tokens but the text tower only {} embeddings (a tokenizer from another model?)",
                dir.display(),
                tok.vocab_size(),
                cfg.text_config.vocab_size
            )));
        }
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(io_err(&weights))?;
        let id = gk_data::sha256::hex(&bytes);
        let tensors = read_safetensors(&weights, dev)?;
        let model = ClipModel::new(VarBuilder::from_tensors(tensors, DType::F32, dev), &cfg)
            .map_err(|e| TrainError::Format {
                path: weights.clone(),
                msg: format!("weights do not fit config.json: {e}"),
            })?;
        let meta_path = dir.join("teacher.json");
        let meta = if meta_path.is_file() {
            let text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
            serde_json::from_str(&text).map_err(|e| TrainError::Format {
                path: meta_path.clone(),
                msg: e.to_string(),
            })?
        } else {
            TeacherMeta {
                image_size: cfg.vision_config.image_size,
                max_text_len: cfg.text_config.max_position_embeddings,
                mean: Normalize::CLIP.mean,
                std: Normalize::CLIP.std,
                retrieval: None,
            }
        };
        Ok(Self {
            dim: cfg.projection_dim,
            model,
            tok,
            cfg,
            id,
            meta,
            dev: dev.clone(),
        })
    }

    fn norm(&self) -> Normalize {
        Normalize {
            mean: self.meta.mean,
            std: self.meta.std,
        }
    }

    /// `[N, 3, S, S]` teacher input of whole images (CLIP's resize and centre crop).
    fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        let s = self.meta.image_size as u32;
        let t: Vec<Tensor> = images
            .iter()
            .map(|im| {
                image_io::to_tensor(&image_io::clip_resize_crop(im, s), &self.norm(), &self.dev)
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Tensor::stack(&t, 0)?)
    }

    /// L2-normalised image embeddings `[N, dim]`.
    pub fn image_embeds(&self, images: &[RgbImage]) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in images.chunks(CHUNK) {
            out.push(l2_normalize(
                &self.model.encode_image(&self.pixels(chunk)?)?.embeds,
            )?);
        }
        Ok(Tensor::cat(&out, 0)?.detach())
    }

    /// L2-normalised embeddings `[R, dim]` of square crops around `boxes` (pixel xyxy).
    pub fn region_embeds(&self, image: &RgbImage, boxes: &[Box4]) -> Result<Tensor> {
        let crops: Vec<RgbImage> = boxes.iter().map(|b| region_crop(image, *b)).collect();
        self.image_embeds(&crops)
    }

    /// For records (`targets`: each record's image and pixel-xyxy box; `texts` their text
    /// embeddings `[R, P]`): the target regions' embeddings `[R, P]` and, when `offsets` are
    /// given (one list per record), the teacher's `[R, 1 + K]` scores of the target crop
    /// (column 0) and of each SLA candidate's crop against the record's expression. All
    /// crops go through the teacher together.
    pub fn regions_and_sla(
        &self,
        targets: &[(&RgbImage, Box4)],
        offsets: Option<&[Vec<Offset>]>,
        texts: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let k = offsets.and_then(|o| o.first()).map_or(0, Vec::len);
        let mut crops = Vec::with_capacity(targets.len() * (k + 1));
        for (i, &(image, t)) in targets.iter().enumerate() {
            crops.push(region_crop(image, t));
            if let Some(offsets) = offsets {
                let c = gk_box::xyxy_to_cxcywh(t);
                crops.extend(
                    offsets[i]
                        .iter()
                        .map(|&o| region_crop(image, gk_box::cxcywh_to_xyxy(apply_offset(c, o)))),
                );
            }
        }
        let e = self
            .image_embeds(&crops)?
            .reshape((targets.len(), k + 1, self.dim))?;
        let scores = match offsets {
            Some(_) => Some(e.broadcast_mul(&texts.unsqueeze(1)?)?.sum(2)?), // [R, 1 + K]
            None => None,
        };
        Ok((e.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?, scores))
    }

    /// The teacher's embeddings of a training batch as the student sees it (augmented,
    /// letterboxed, expressions after the flip's word swap): the live alternative to
    /// [`FeatureCache`]. `pixels` were normalised with `norm`; `ids` are the records' ids
    /// (they seed the SLA candidates when `sla`).
    pub fn live_batch(
        &self,
        batch: &gk_data::batch::Batch,
        ids: &[&str],
        norm: &Normalize,
        sla: bool,
    ) -> Result<TeacherBatch> {
        let images = unnormalize(&batch.sample_pixels()?.0, norm)?;
        let side = images.first().map_or(1, |im| im.width()) as f32;
        let texts: Vec<&str> = batch.exprs.iter().map(String::as_str).collect();
        let text = self.text_embeds(&texts)?;
        let image = self.image_embeds(&images)?;
        let targets: Vec<(&RgbImage, Box4)> = images
            .iter()
            .zip(batch.target.to_vec2::<f32>()?)
            .map(|(im, t)| {
                let b = gk_box::cxcywh_to_xyxy([t[0], t[1], t[2], t[3]]);
                (im, b.map(|v| v * side))
            })
            .collect();
        let offsets: Vec<Vec<Offset>> = ids.iter().map(|id| sla_offsets(id)).collect();
        let (region, scores) =
            self.regions_and_sla(&targets, sla.then_some(offsets.as_slice()), &text)?;
        let sla = match scores {
            Some(scores) => {
                let scores = scores.to_vec2::<f32>()?;
                Some(SlaBatch {
                    offsets,
                    target: scores.iter().map(|r| r[0]).collect(),
                    scores: scores.into_iter().map(|r| r[1..].to_vec()).collect(),
                })
            }
            None => None,
        };
        Ok(TeacherBatch {
            image,
            text,
            region,
            scale: f64::from(self.model.logit_scale()?.to_scalar::<f32>()?),
            sla,
        })
    }

    /// `[N, L]` ids and mask of texts.
    fn encode(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        let l = self.meta.max_text_len;
        let (mut ids, mut mask) = (
            Vec::with_capacity(texts.len() * l),
            Vec::with_capacity(texts.len() * l),
        );
        for t in texts {
            let e = self.tok.encode(t, l)?;
            ids.extend(e.ids);
            mask.extend(e.mask);
        }
        Ok((
            Tensor::from_vec(ids, (texts.len(), l), &self.dev)?,
            Tensor::from_vec(mask, (texts.len(), l), &self.dev)?,
        ))
    }

    /// L2-normalised text embeddings `[N, dim]`.
    pub fn text_embeds(&self, texts: &[&str]) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in texts.chunks(CHUNK) {
            let (ids, mask) = self.encode(chunk)?;
            out.push(l2_normalize(
                &self.model.encode_text(&ids, Some(&mask))?.embeds,
            )?);
        }
        Ok(Tensor::cat(&out, 0)?.detach())
    }
}

/// `[B, 3, S, S]` normalised pixels back to 8-bit images.
fn unnormalize(pixels: &Tensor, norm: &Normalize) -> Result<Vec<RgbImage>> {
    let (b, _, h, w) = pixels.dims4()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let v = pixels.get(i)?.flatten_all()?.to_vec1::<f32>()?; // [3 * h * w], planar
        let plane = h * w;
        out.push(RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let at = y as usize * w + x as usize;
            image::Rgb(std::array::from_fn(|c| {
                ((v[c * plane + at] * norm.std[c] + norm.mean[c]) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            }))
        }));
    }
    Ok(out)
}

/// A square crop centred on `b` with a quarter of margin, grey outside the image: what the
/// teacher sees of a region (in pretraining and when scoring regions).
pub fn region_crop(image: &RgbImage, b: Box4) -> RgbImage {
    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
    let side = ((b[2] - b[0]).max(b[3] - b[1]) * 1.25).max(4.0);
    let n = side.round() as u32;
    let (x0, y0) = (cx - side / 2.0, cy - side / 2.0);
    RgbImage::from_fn(n, n, |x, y| {
        let (sx, sy) = ((x0 + x as f32).floor(), (y0 + y as f32).floor());
        if sx < 0.0 || sy < 0.0 || sx >= image.width() as f32 || sy >= image.height() as f32 {
            image::Rgb([128, 128, 128])
        } else {
            *image.get_pixel(sx as u32, sy as u32)
        }
    })
}

/// Settings of [`pretrain`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub seed: u64,
    pub image_size: usize,
    pub max_text_len: usize,
    pub hidden: usize,
    pub vision_layers: usize,
    pub text_layers: usize,
    pub projection_dim: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// Also train on object crops described by their labels.
    pub object_crops: bool,
}

impl PretrainConfig {
    /// The benchmark teacher: a 4-layer ViT (64 px, 8 px patches) and a 3-layer text tower
    /// of width 128, a few minutes on 2 cores.
    pub fn synth() -> Self {
        Self {
            seed: 0,
            image_size: 64,
            max_text_len: 48,
            hidden: 128,
            vision_layers: 4,
            text_layers: 3,
            projection_dim: 128,
            epochs: 6,
            batch_size: 64,
            lr: 5e-4,
            weight_decay: 0.05,
            warmup_steps: 100,
            object_crops: true,
        }
    }

    fn clip(&self, vocab_size: usize) -> ClipConfig {
        let heads = (self.hidden / 32).max(1);
        ClipConfig {
            vision_config: ClipVisionConfig {
                hidden_size: self.hidden,
                intermediate_size: 2 * self.hidden,
                num_hidden_layers: self.vision_layers,
                num_attention_heads: heads,
                num_channels: 3,
                image_size: self.image_size,
                patch_size: 8,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
                lora: Vec::new(),
            },
            text_config: ClipTextConfig {
                vocab_size,
                hidden_size: self.hidden,
                intermediate_size: 2 * self.hidden,
                num_hidden_layers: self.text_layers,
                num_attention_heads: heads,
                max_position_embeddings: self.max_text_len,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
                // the word-level tokenizer's [PAD], [CLS], [SEP]
                pad_token_id: 0,
                bos_token_id: 2,
                eos_token_id: 3,
                lora: Vec::new(),
            },
            projection_dim: self.projection_dim,
        }
    }
}

/// Recall at 1 and 5 both ways, in percent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    pub n: usize,
    pub image_to_text_r1: f64,
    pub image_to_text_r5: f64,
    pub text_to_image_r1: f64,
    pub text_to_image_r5: f64,
}

/// Zero-shot retrieval on held-out pairs: whole scenes and object crops.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    pub scenes: Recall,
    pub objects: Recall,
}

/// One image-text pair of the pretraining set.
struct Pair {
    image: RgbImage,
    text: String,
}

pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| TrainError::Format {
                path: path.to_path_buf(),
                msg: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// An object's label as a short description (`a small red striped circle`).
fn describe(o: &serde_json::Value) -> Option<String> {
    let f = |k: &str| o.get(k).and_then(|v| v.as_str());
    let texture = f("texture").filter(|t| *t != "plain");
    Some(
        [
            Some("a"),
            f("size"),
            Some(f("colour")?),
            texture,
            Some(f("shape")?),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" "),
    )
}

/// Scene pairs and object-crop pairs of one split (`train` or `val`).
fn load_pairs(
    data: &Path,
    split: &str,
    crops: bool,
    image_size: u32,
) -> Result<(Vec<Pair>, Vec<Pair>)> {
    let prefix = format!("images/{split}/");
    let small = |im: &RgbImage| image_io::clip_resize_crop(im, image_size);
    let mut scenes = Vec::new();
    for c in read_jsonl(&data.join("captions.jsonl"))? {
        let (Some(img), Some(text)) = (c["image"].as_str(), c["caption"].as_str()) else {
            continue;
        };
        if c["split"].as_str() == Some(split)
            || (c.get("split").is_none() && img.starts_with(&prefix))
        {
            scenes.push(Pair {
                image: small(&image_io::load_rgb(&data.join(img))?),
                text: text.to_string(),
            });
        }
    }
    let mut objects = Vec::new();
    if crops {
        for row in read_jsonl(&data.join("objects.jsonl"))? {
            let Some(img) = row["image"].as_str().filter(|i| i.starts_with(&prefix)) else {
                continue;
            };
            let image = image_io::load_rgb(&data.join(img))?;
            for o in row["objects"].as_array().into_iter().flatten() {
                let b: Option<Vec<f32>> = o["bbox_xyxy"].as_array().map(|v| {
                    v.iter()
                        .filter_map(|x| x.as_f64())
                        .map(|x| x as f32)
                        .collect()
                });
                if let (Some(text), Some(&[x1, y1, x2, y2])) = (describe(o), b.as_deref()) {
                    objects.push(Pair {
                        image: small(&region_crop(&image, [x1, y1, x2, y2])),
                        text,
                    });
                }
            }
        }
    }
    Ok((scenes, objects))
}

/// Trains a teacher on `data` (a folder written by `groundkit synth`) and writes it to
/// `out` in the Hugging Face CLIP layout plus `teacher.json`. `progress(step, total,
/// loss)` is called after every step.
pub fn pretrain(
    data: &Path,
    out: &Path,
    cfg: &PretrainConfig,
    dev: &Device,
    mut progress: impl FnMut(usize, usize, f32),
) -> Result<RetrievalReport> {
    let size = cfg.image_size as u32;
    let (scenes, objects) = load_pairs(data, "train", cfg.object_crops, size)?;
    let (val_scenes, val_objects) = load_pairs(data, "val", true, size)?;
    let train: Vec<&Pair> = scenes.iter().chain(&objects).collect();
    if train.len() < cfg.batch_size {
        return Err(TrainError::Config(format!(
            "{}: {} training pairs, fewer than a batch",
            data.display(),
            train.len()
        )));
    }
    // Vocabulary: every caption and label word, and the grounding expressions' words so the
    // teacher can read expressions too (words it never trained on keep random embeddings).
    let mut texts: Vec<String> = train.iter().map(|p| p.text.clone()).collect();
    for split in ["train", "val"] {
        let path = data.join(format!("{split}.jsonl"));
        if path.is_file() {
            texts.extend(
                read_jsonl(&path)?
                    .iter()
                    .filter_map(|r| r["expr"].as_str().map(str::to_string)),
            );
        }
    }
    let tok = tokenize::word_level(texts.iter().map(String::as_str))?;
    let clip = cfg.clip(tok.vocab_size());
    let map = VarMap::new();
    let model = ClipModel::new(seeded_var_builder(&map, cfg.seed, dev), &clip)?;
    let meta = TeacherMeta {
        image_size: cfg.image_size,
        max_text_len: cfg.max_text_len,
        mean: Normalize::CLIP.mean,
        std: Normalize::CLIP.std,
        retrieval: None,
    };
    let norm = Normalize {
        mean: meta.mean,
        std: meta.std,
    };
    let mut opt = AdamW::new(&map, &[], cfg.weight_decay)?;
    let per_epoch = train.len() / cfg.batch_size;
    let total = per_epoch * cfg.epochs;
    let mut step = 0;
    for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
            gk_data::batch::mix_seed(&[cfg.seed, epoch as u64]),
        ));
        for batch in order.chunks_exact(cfg.batch_size) {
            let pix: Vec<Tensor> = batch
                .iter()
                .map(|&i| image_io::to_tensor(&train[i].image, &norm, dev))
                .collect::<std::result::Result<_, _>>()?;
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            for &i in batch {
                let e = tok.encode(&train[i].text, cfg.max_text_len)?;
                ids.extend(e.ids);
                mask.extend(e.mask);
            }
            let b = batch.len();
            let ids = Tensor::from_vec(ids, (b, cfg.max_text_len), dev)?;
            let mask = Tensor::from_vec(mask, (b, cfg.max_text_len), dev)?;
            let img = model.encode_image(&Tensor::stack(&pix, 0)?)?.embeds;
            let txt = model.encode_text(&ids, Some(&mask))?.embeds;
            let scale = model.logit_scale()?.clamp(1.0, 100.0)?; // CLIP clamps at 100
            let loss = info_nce(&img, &txt, &scale)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    parts: format!("info_nce {value}"),
                });
            }
            let mut grads = loss.backward()?;
            opt.clip_grad_norm(&mut grads, 1.0)?;
            opt.step(
                &grads,
                cfg.lr
                    * lr_factor(
                        Schedule::Cosine { min_ratio: 0.02 },
                        step,
                        total,
                        cfg.warmup_steps,
                    ),
            )?;
            step += 1;
            progress(step, total, value);
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    save_atomic(&map, &out.join("model.safetensors"))?;
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&clip)
            .expect("config serialises")
            .as_bytes(),
    )?;
    tok.inner()
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| TrainError::Format {
            path: out.join("tokenizer.json"),
            msg: e.to_string(),
        })?;
    // Evaluate through the saved folder: what users of the teacher will load.
    write_atomic(
        &out.join("teacher.json"),
        serde_json::to_string_pretty(&meta)
            .expect("meta serialises")
            .as_bytes(),
    )?;
    let teacher = Teacher::open(out, dev)?;
    let report = RetrievalReport {
        scenes: retrieval(&teacher, &val_scenes)?,
        objects: retrieval(&teacher, &val_objects)?,
    };
    let meta = TeacherMeta {
        retrieval: Some(report.clone()),
        ..meta
    };
    write_atomic(
        &out.join("teacher.json"),
        serde_json::to_string_pretty(&meta)
            .expect("meta serialises")
            .as_bytes(),
    )?;
    Ok(report)
}

/// Retrieval recall on pairs; a retrieved item counts when its text equals the query's
/// (object crops share descriptions, so the same text on another crop is a hit).
fn retrieval(t: &Teacher, pairs: &[Pair]) -> Result<Recall> {
    let n = pairs.len();
    if n == 0 {
        return Ok(Recall::default());
    }
    let images: Vec<RgbImage> = pairs.iter().map(|p| p.image.clone()).collect();
    let texts: Vec<&str> = pairs.iter().map(|p| p.text.as_str()).collect();
    let sim = t
        .image_embeds(&images)?
        .matmul(&t.text_embeds(&texts)?.t()?)?
        .to_vec2::<f32>()?; // [N, N]
    let rank_hits = |scores: Vec<(usize, f32)>, want: &str| -> (bool, bool) {
        let mut s = scores;
        s.sort_by(|a, b| b.1.total_cmp(&a.1));
        let pos = s.iter().position(|(j, _)| texts[*j] == want).unwrap_or(n);
        (pos < 1, pos < 5)
    };
    let (mut i1, mut i5, mut t1, mut t5) = (0, 0, 0, 0);
    for i in 0..n {
        let (a, b) = rank_hits((0..n).map(|j| (j, sim[i][j])).collect(), texts[i]);
        i1 += usize::from(a);
        i5 += usize::from(b);
        let (a, b) = rank_hits((0..n).map(|j| (j, sim[j][i])).collect(), texts[i]);
        t1 += usize::from(a);
        t5 += usize::from(b);
    }
    let pct = |k: usize| 100.0 * k as f64 / n as f64;
    Ok(Recall {
        n,
        image_to_text_r1: pct(i1),
        image_to_text_r5: pct(i5),
        text_to_image_r1: pct(t1),
        text_to_image_r5: pct(t5),
    })
}

/// The teacher's embeddings of every record of a training set, kept on disk beside the
/// teacher (`<teacher>/cache/<records key>.safetensors` + `.json`) so runs over the same
/// data (seeds, ablations) compute them once. Whole, unaugmented images and the
/// expressions as written; with SLA, the teacher's scores of every record's candidate
/// crops ([`sla_offsets`]) too. A cache made by another teacher or from other records is
/// rebuilt, never used; one without SLA scores is rebuilt when they are needed.
#[derive(Debug)]
pub struct FeatureCache {
    image: Tensor,
    text: Tensor,
    region: Tensor,
    /// `[N, 1 + K]`: target crop score, then the candidates' (present when built with SLA).
    sla: Option<Tensor>,
    rows: std::collections::HashMap<String, usize>,
    /// The teacher's logit scale (`exp(logit_scale)`).
    pub scale: f64,
}

/// What [`FeatureCache::load_or_build`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheStatus {
    Hit,
    Built,
    Rebuilt(String),
}

/// Bumped when the cached tensors change (2: + target regions; 3: + SLA scores).
const CACHE_VERSION: u32 = 3;

#[derive(Debug, Serialize, Deserialize)]
struct CacheMeta {
    #[serde(default)]
    version: u32,
    teacher_id: String,
    records_key: String,
    #[serde(default)]
    sla: bool,
    ids: Vec<String>,
}

/// sha256 over every record's id, image and expression: names a training set's content.
pub fn records_key(ds: &gk_data::dataset::Dataset) -> String {
    let mut s = String::new();
    for r in &ds.records {
        s += &format!("{}\t{}\t{}\n", r.id, r.image, r.expr);
    }
    gk_data::sha256::hex(s.as_bytes())
}

impl FeatureCache {
    /// Loads the cache of `ds` for `teacher`, or computes and writes it; `sla` asks for the
    /// SLA candidate scores too.
    pub fn load_or_build(
        teacher: &Teacher,
        teacher_dir: &Path,
        ds: &gk_data::dataset::Dataset,
        sla: bool,
        progress: impl FnMut(usize, usize),
    ) -> Result<(Self, CacheStatus)> {
        let key = records_key(ds);
        let dir = teacher_dir.join("cache");
        let (tensors_path, meta_path) = (
            dir.join(format!("{}.safetensors", &key[..16])),
            dir.join(format!("{}.json", &key[..16])),
        );
        let scale = f64::from(teacher.model.logit_scale()?.to_scalar::<f32>()?);
        let status = match Self::read(teacher, &tensors_path, &meta_path, &key, sla, scale)? {
            Ok(cache) => return Ok((cache, CacheStatus::Hit)),
            Err(None) => CacheStatus::Built,
            Err(Some(why)) => CacheStatus::Rebuilt(why),
        };
        let cache = Self::build(teacher, ds, sla, scale, progress)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut tensors = std::collections::HashMap::from([
            ("image".to_string(), cache.image.clone()),
            ("text".to_string(), cache.text.clone()),
            ("region".to_string(), cache.region.clone()),
        ]);
        if let Some(t) = &cache.sla {
            tensors.insert("sla".to_string(), t.clone());
        }
        crate::weights::save_tensors_atomic(&tensors, &tensors_path)?;
        let meta = CacheMeta {
            version: CACHE_VERSION,
            teacher_id: teacher.id.clone(),
            records_key: key,
            sla,
            ids: ds.records.iter().map(|r| r.id.clone()).collect(),
        };
        write_atomic(
            &meta_path,
            serde_json::to_string(&meta)
                .expect("meta serialises")
                .as_bytes(),
        )?;
        Ok((cache, status))
    }

    /// The cache on disk if it is usable (`Ok`), else why not (`Err(None)`: there is none).
    fn read(
        teacher: &Teacher,
        tensors_path: &Path,
        meta_path: &Path,
        key: &str,
        sla: bool,
        scale: f64,
    ) -> Result<std::result::Result<Self, Option<String>>> {
        if !(meta_path.is_file() && tensors_path.is_file()) {
            return Ok(Err(None));
        }
        let text = std::fs::read_to_string(meta_path).map_err(io_err(meta_path))?;
        let meta: CacheMeta = serde_json::from_str(&text).map_err(|e| TrainError::Format {
            path: meta_path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let why = if meta.version != CACHE_VERSION {
            format!("cache format {} is not {CACHE_VERSION}", meta.version)
        } else if meta.teacher_id != teacher.id {
            "the teacher's weights changed".into()
        } else if meta.records_key != key {
            "the training records changed".into()
        } else if sla && !meta.sla {
            "the cache has no SLA scores".into()
        } else {
            String::new()
        };
        if !why.is_empty() {
            return Ok(Err(Some(why)));
        }
        let t = read_safetensors(tensors_path, &teacher.dev)?;
        let bad = |msg: String| TrainError::Format {
            path: tensors_path.to_path_buf(),
            msg,
        };
        let (Some(image), Some(text), Some(region)) =
            (t.get("image"), t.get("text"), t.get("region"))
        else {
            return Err(bad(
                "teacher cache without `image`/`text`/`region` tensors".into()
            ));
        };
        let want = [meta.ids.len(), teacher.dim];
        if image.dims() != want || text.dims() != want || region.dims() != want {
            return Err(bad(format!(
                "teacher cache shapes {:?}/{:?}/{:?} do not fit {} rows of size {}",
                image.dims(),
                text.dims(),
                region.dims(),
                meta.ids.len(),
                teacher.dim
            )));
        }
        let sla_t = match (meta.sla, t.get("sla")) {
            (false, _) => None,
            (true, Some(s)) if s.dims() == [meta.ids.len(), 1 + SLA_CANDIDATES] => Some(s.clone()),
            (true, s) => {
                return Err(bad(format!(
                    "teacher cache SLA scores {:?} do not fit {} rows of {} candidates",
                    s.map(|s| s.dims().to_vec()),
                    meta.ids.len(),
                    SLA_CANDIDATES
                )))
            }
        };
        Ok(Ok(Self {
            image: image.clone(),
            text: text.clone(),
            region: region.clone(),
            sla: sla_t,
            rows: meta
                .ids
                .into_iter()
                .enumerate()
                .map(|(i, id)| (id, i))
                .collect(),
            scale,
        }))
    }

    /// Computes the embeddings: text per record, image once per distinct image, target
    /// regions (and SLA scores) per record on its image.
    fn build(
        teacher: &Teacher,
        ds: &gk_data::dataset::Dataset,
        sla: bool,
        scale: f64,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let n = ds.records.len();
        let mut image_row = std::collections::HashMap::new();
        let mut images: Vec<Vec<usize>> = Vec::new(); // records per distinct image
        let mut which = Vec::with_capacity(n);
        for (i, r) in ds.records.iter().enumerate() {
            let k = *image_row.entry(r.image.clone()).or_insert_with(|| {
                images.push(Vec::new());
                images.len() - 1
            });
            images[k].push(i);
            which.push(k as u32);
        }
        let total = images.len() + n;
        let mut texts = Vec::new();
        for (c, chunk) in ds.records.chunks(CHUNK).enumerate() {
            let t: Vec<&str> = chunk.iter().map(|r| r.expr.as_str()).collect();
            texts.push(teacher.text_embeds(&t)?);
            progress(c * CHUNK + chunk.len(), total);
        }
        let text = Tensor::cat(&texts, 0)?;
        let (mut embeds, mut region_parts, mut sla_parts) = (Vec::new(), Vec::new(), Vec::new());
        let mut region_row = vec![0u32; n]; // record -> row of the concatenated regions
        let mut next = 0u32;
        for (c, chunk) in images.chunks(CHUNK).enumerate() {
            let decoded: Vec<RgbImage> = chunk
                .iter()
                .map(|recs| ds.get(recs[0]).map(|s| s.image))
                .collect::<std::result::Result<_, _>>()?;
            embeds.push(teacher.image_embeds(&decoded)?);
            // every record on these images, in one teacher pass
            let recs: Vec<(usize, &RgbImage)> = decoded
                .iter()
                .zip(chunk)
                .flat_map(|(img, recs)| recs.iter().map(move |&i| (i, img)))
                .collect();
            let targets: Vec<(&RgbImage, Box4)> = recs
                .iter()
                .map(|&(i, img)| (img, ds.records[i].bbox_xyxy))
                .collect();
            let offsets: Vec<Vec<Offset>> = recs
                .iter()
                .map(|&(i, _)| sla_offsets(&ds.records[i].id))
                .collect();
            let idx: Vec<u32> = recs.iter().map(|&(i, _)| i as u32).collect();
            let rec_text = text.index_select(&Tensor::new(idx.as_slice(), &teacher.dev)?, 0)?;
            let (region, scores) =
                teacher.regions_and_sla(&targets, sla.then_some(offsets.as_slice()), &rec_text)?;
            region_parts.push(region);
            sla_parts.extend(scores);
            for &(i, _) in &recs {
                region_row[i] = next;
                next += 1;
            }
            progress(n + c * CHUNK + chunk.len(), total);
        }
        let image =
            Tensor::cat(&embeds, 0)?.index_select(&Tensor::from_vec(which, n, &teacher.dev)?, 0)?;
        let rows = Tensor::from_vec(region_row, n, &teacher.dev)?;
        let region = Tensor::cat(&region_parts, 0)?.index_select(&rows, 0)?;
        let sla = if sla {
            Some(Tensor::cat(&sla_parts, 0)?.index_select(&rows, 0)?)
        } else {
            None
        };
        Ok(Self {
            image,
            text,
            region,
            sla,
            rows: ds
                .records
                .iter()
                .enumerate()
                .map(|(i, r)| (r.id.clone(), i))
                .collect(),
            scale,
        })
    }

    /// The cached embeddings of dataset records `indices`; `flipped` (per sample, when the
    /// run uses SLA) mirrors the candidates' offsets to the frame the student sees.
    pub fn batch(
        &self,
        ds: &gk_data::dataset::Dataset,
        indices: &[usize],
        flipped: Option<&[bool]>,
    ) -> Result<TeacherBatch> {
        let mut rows = Vec::with_capacity(indices.len());
        for &i in indices {
            let id = &ds.records[i].id;
            let r = self.rows.get(id).ok_or_else(|| {
                TrainError::Config(format!(
                    "the teacher cache has no entry for record {id}: it was built from other data"
                ))
            })?;
            rows.push(*r as u32);
        }
        let idx = Tensor::from_vec(rows, indices.len(), self.image.device())?;
        let sla = match (flipped, &self.sla) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(TrainError::Config(
                    "the teacher cache was built without SLA scores".into(),
                ))
            }
            (Some(flipped), Some(sla)) => {
                let scores = sla.index_select(&idx, 0)?.to_vec2::<f32>()?;
                Some(SlaBatch {
                    offsets: indices
                        .iter()
                        .zip(flipped)
                        .map(|(&i, &f)| {
                            let o = sla_offsets(&ds.records[i].id);
                            if f {
                                o.into_iter().map(mirror).collect()
                            } else {
                                o
                            }
                        })
                        .collect(),
                    target: scores.iter().map(|r| r[0]).collect(),
                    scores: scores.into_iter().map(|r| r[1..].to_vec()).collect(),
                })
            }
        };
        Ok(TeacherBatch {
            image: self.image.index_select(&idx, 0)?,
            text: self.text.index_select(&idx, 0)?,
            region: self.region.index_select(&idx, 0)?,
            scale: self.scale,
            sla,
        })
    }
}

/// Where a run's teacher embeddings come from: the feature cache of the unaugmented data,
/// or the teacher itself on every augmented batch (`[distill] live = true`).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per run
pub enum TeacherFeatures {
    Cached(FeatureCache),
    Live { teacher: Teacher, norm: Normalize },
}

impl TeacherFeatures {
    /// The teacher's side of one training batch; `sla` asks for the SLA inputs.
    pub fn batch(
        &self,
        ds: &gk_data::dataset::Dataset,
        batch: &gk_data::batch::Batch,
        sla: bool,
    ) -> Result<TeacherBatch> {
        match self {
            Self::Cached(c) => c.batch(ds, &batch.indices, sla.then_some(batch.flipped.as_slice())),
            Self::Live { teacher, norm } => {
                let ids: Vec<&str> = batch
                    .indices
                    .iter()
                    .map(|&i| ds.records[i].id.as_str())
                    .collect();
                teacher.live_batch(batch, &ids, norm, sla)
            }
        }
    }
}
