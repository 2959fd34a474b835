//! CKD: weakly supervised grounding by contrastive knowledge distillation
//! (`shared/methods.md` §4; `jhuang81/weak-sup-visual-grounding`, `nce_distill_model.py`).
//! Training sees image-expression pairs and never a box: the student scores proposals
//! against phrases, learns from the in-batch image-sentence contrast and distils the
//! training-time detector's class posteriors; evaluation and prediction use the student
//! and the proposals only.
//!
//! - [`region_phrase_scores`]: `s(r, p) = <e_r, e_p>` for every phrase of every sentence
//!   against every region of every image, `[B, P, B, R]`.
//! - [`image_sentence_scores`]: `S(I_j, sent_i) = Σ_p scale · max_r s(r, p)` (padding
//!   phrases and regions masked; CKD's scale 2).
//! - [`nce_loss`]: cross-entropy of each sentence's row of `S` against its own image;
//!   other samples of the same image are removed from the negatives (ours: CKD's batches
//!   hold one sentence per image, our records several per image).
//! - [`distill_targets`] + [`distill_loss`]: for a phrase with a detector class, the
//!   student's top region `r*` in its own image, the K proposals with the highest IoU with
//!   `r*` (itself included), the teacher `q = softmax(norm(P_det[r, class]))` over them and
//!   the soft-label cross-entropy `-Σ q log softmax(s)`; mean over such phrases.
//! - [`ramp`]: `λ(t) = min(0.001 + ⌊t / every⌋, max)` (CKD: every 500 steps, max 3).
//!
//! The run (config, proposal cache, loop with checkpoints and exact resume, evaluation
//! with phrase R@1/5/10 and expression Acc@0.5) follows `train.rs`; `CkdPredictor` answers
//! one query without any detector file.

use crate::detector::TrainedDetector;
use crate::error::{Result, TrainError};
use crate::eval::{EvalReport, Tally};
use crate::losses::LossParts;
use crate::optim::AdamW;
use crate::run::RunDir;
use crate::train::{DataConfig, OptimConfig, Steps, TrainOptions, TrainerState};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarMap;
use gk_box::Box4;
use gk_data::batch::{Batch, Loader};
use gk_data::dataset::{resolve_image, Dataset};
use gk_data::phrases::{record_phrases, ClassMap, Labels, Phrase};
use gk_data::proposals::{propose, ProposalConfig};
use gk_data::tokenize::TextTokenizer;
use gk_data::transforms::TransformConfig;
use gk_models::ckd::{CkdModel, CkdModelConfig};
use gk_models::roi_align::Roi;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How the detector's posteriors over the K regions become the teacher's logits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TeacherNorm {
    /// Subtract the mean over the K regions (CKD with Open Images classes).
    SubtractMean,
    /// Divide by `by` (CKD with COCO classes: 2).
    Divide { by: f32 },
}

/// `[ckd]`: the method's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CkdConfig {
    /// The detector classes and their words (`labels.json` of the benchmark).
    pub labels: PathBuf,
    /// The training-time detector folder (`groundkit train-detector`); none = NCE only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<PathBuf>,
    #[serde(default)]
    pub proposals: ProposalConfig,
    /// Phrases per sentence (CKD: 16).
    pub max_phrases: usize,
    /// The image-sentence score's factor (CKD: 2, an inverse temperature).
    pub score_scale: f64,
    /// Regions per distilled phrase (CKD: 8).
    pub distill_k: usize,
    /// The student's distillation logits are `student_scale · s(r, p)` (CKD: 1).
    #[serde(default = "unit")]
    pub student_scale: f64,
    pub ramp_every: usize,
    pub ramp_max: f64,
    pub teacher_norm: TeacherNorm,
    /// Drop other samples of the same image from a sentence's negatives.
    pub mask_same_image: bool,
    /// Image-caption pairs (`captions.jsonl` rows `{image, split, caption}`, split
    /// `train`) added to the training sentences; the phrases of a caption come from the
    /// chunker. Images resolve like the training set's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captions: Option<PathBuf>,
    /// Train on the referring expressions of `data.train` too.
    #[serde(default = "yes")]
    pub expressions: bool,
}

fn yes() -> bool {
    true
}

fn unit() -> f64 {
    1.0
}

/// The caption pairs of `path` (split `train`) as records of `root`'s images; a record's
/// box is the whole image (never read: training reads no box).
fn caption_records(path: &Path, root: &Path) -> Result<Vec<gk_data::record::Record>> {
    let mut out = Vec::new();
    for (n, row) in crate::teacher::read_jsonl(path)?.into_iter().enumerate() {
        if row
            .get("split")
            .and_then(|v| v.as_str())
            .is_some_and(|s| s != "train")
        {
            continue;
        }
        let (Some(image), Some(caption)) = (row["image"].as_str(), row["caption"].as_str()) else {
            return Err(TrainError::Format {
                path: path.to_path_buf(),
                msg: format!("line {}: needs image and caption", n + 1),
            });
        };
        let file = resolve_image(root, image);
        let (w, h) = image::image_dimensions(&file).map_err(|e| TrainError::Format {
            path: file.clone(),
            msg: e.to_string(),
        })?;
        out.push(gk_data::record::Record {
            id: format!("caption/{n:06}"),
            dataset: "captions".into(),
            split_by: None,
            split: "train".into(),
            image: image.into(),
            width: Some(w),
            height: Some(h),
            bbox_xyxy: [0.0, 0.0, w as f32, h as f32],
            bbox_src: "xyxy".into(),
            expr: caption.into(),
            extra: Default::default(),
        });
    }
    Ok(out)
}

/// The training sentences: the expressions of `data.train` and/or the caption pairs.
fn training_set(cfg: &CkdRunConfig) -> Result<Dataset> {
    let mut ds = crate::train::load_set_with(&cfg.data, &cfg.data.train)?;
    if !cfg.ckd.expressions {
        ds.records.clear();
    }
    if let Some(c) = &cfg.ckd.captions {
        let root = ds.image_root.clone();
        ds.records.extend(caption_records(c, &root)?);
    }
    if ds.records.is_empty() {
        return Err(TrainError::Config(
            "no training sentences: expressions = false and no captions".into(),
        ));
    }
    Ok(ds)
}

impl CkdConfig {
    /// CKD's settings, with the ramp stepped every 50 steps instead of 500 (our runs are
    /// a few hundred steps long); the benchmark's scene captions join the expressions as
    /// training sentences (image-caption pairs, as CKD's Flickr30k captions).
    pub fn synth(data: &Path) -> Self {
        Self {
            labels: data.join("labels.json"),
            detector: None,
            proposals: ProposalConfig::default(),
            max_phrases: 16,
            score_scale: 2.0,
            distill_k: 8,
            student_scale: 1.0,
            ramp_every: 50,
            ramp_max: 3.0,
            teacher_norm: TeacherNorm::SubtractMean,
            mask_same_image: true,
            captions: Some(data.join("captions.jsonl")),
            expressions: true,
        }
    }
}

/// A CKD run's `config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CkdRunConfig {
    pub seed: u64,
    pub model: CkdModelConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub ckd: CkdConfig,
}

impl CkdRunConfig {
    /// The embedded benchmark: the demo's data and optimiser (CKD uses Adam at 1e-4 on
    /// frozen detector features; our backbone trains from scratch, so the demo's 1e-3),
    /// no augmentation (proposals are computed once per image).
    pub fn synth(data: &Path, epochs: usize) -> Self {
        let base = crate::train::RunConfig::synth(data, epochs);
        let mut optim = base.optim;
        optim.augment = TransformConfig::eval(base.model.image_size as u32);
        optim.group_images = false; // CKD batches its own way (captions, proposals)
        Self {
            seed: 0,
            model: CkdModelConfig::synth(),
            data: base.data,
            optim,
            ckd: CkdConfig::synth(data),
        }
    }
}

/// Whether a config (or a run's `config.toml`) is a CKD one: it has a `[ckd]` table.
pub fn is_ckd_config(text: &str) -> bool {
    text.parse::<toml::Table>()
        .map(|t| t.contains_key("ckd"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------- scores and losses

/// `phrases: [B, P, E]`, `regions: [B, R, E]` (unit norm) -> `s: [B, P, B, R]`.
pub fn region_phrase_scores(phrases: &Tensor, regions: &Tensor) -> Result<Tensor> {
    let (b, p, e) = phrases.dims3()?;
    let (b2, r, _) = regions.dims3()?;
    let s = phrases
        .reshape((b * p, e))?
        .matmul(&regions.reshape((b2 * r, e))?.t()?)?;
    Ok(s.reshape((b, p, b2, r))?)
}

/// `S[i, j] = Σ_p scale · max_r s[i, p, j, r]` over valid phrases of sentence `i` and
/// valid regions of image `j`: `[B, B]`. `region_valid: [B, R]`, `phrase_valid: [B, P]`.
pub fn image_sentence_scores(
    s: &Tensor,
    region_valid: &Tensor,
    phrase_valid: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, _, b2, r) = s.dims4()?;
    let off = ((region_valid - 1.0)? * 1e4)?.reshape((1, 1, b2, r))?;
    let best = s.broadcast_add(&off)?.max(3)?; // [B, P, B]
    let pv = phrase_valid.unsqueeze(2)?;
    Ok((best.broadcast_mul(&pv)?.sum(1)? * scale)?.reshape((b, b2))?)
}

/// Mean cross-entropy of each row of `S` against the diagonal; `exclude: [B, B]` (1 =
/// not a negative) removes pairs from the softmax.
pub fn nce_loss(scores: &Tensor, exclude: Option<&Tensor>) -> Result<Tensor> {
    let n = scores.dim(0)?;
    let logits = match exclude {
        Some(m) => (scores - (m * 1e4)?)?,
        None => scores.clone(),
    };
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let eye = Tensor::eye(n, DType::F32, scores.device())?;
    Ok((logp * eye)?.sum_all()?.affine(-1.0 / n as f64, 0.0)?)
}

/// One distilled phrase: sentence `sample`, phrase `phrase`, its K regions and the
/// teacher distribution over them.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillTarget {
    pub sample: usize,
    pub phrase: usize,
    pub regions: Vec<usize>,
    pub q: Vec<f32>,
}

/// The K regions and teacher distribution of one phrase: `own` are the phrase's scores
/// over its image's regions, `boxes` those regions, `posteriors[r][class]` the detector's.
pub fn distill_targets(
    own: &[f32],
    boxes: &[Box4],
    posteriors: &[Vec<f32>],
    class: usize,
    k: usize,
    norm: TeacherNorm,
) -> (Vec<usize>, Vec<f32>) {
    let Some(top) = (0..own.len()).max_by(|&a, &b| own[a].total_cmp(&own[b])) else {
        return (Vec::new(), Vec::new());
    };
    let mut order: Vec<(f32, usize)> = boxes
        .iter()
        .enumerate()
        .map(|(r, b)| (gk_box::iou(*b, boxes[top]).unwrap_or(0.0), r))
        .collect();
    // highest IoU first; ties by index (the top region has IoU 1 and comes first)
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let regions: Vec<usize> = order.iter().take(k).map(|x| x.1).collect();
    let t: Vec<f32> = regions.iter().map(|&r| posteriors[r][class]).collect();
    let t: Vec<f32> = match norm {
        TeacherNorm::SubtractMean => {
            let m = t.iter().sum::<f32>() / t.len() as f32;
            t.iter().map(|v| v - m).collect()
        }
        TeacherNorm::Divide { by } => t.iter().map(|v| v / by).collect(),
    };
    let mx = t.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = t.iter().map(|v| (v - mx).exp()).collect();
    let z: f32 = e.iter().sum();
    (regions, e.iter().map(|v| v / z).collect())
}

/// `-Σ q log softmax(scale · s[i, p, i, K])`, mean over `targets`; `s: [B, P, B, R]`.
/// Targets with fewer than K regions are padded (masked out of the softmax).
pub fn distill_loss(s: &Tensor, targets: &[DistillTarget], scale: f64) -> Result<Tensor> {
    let (b, p, b2, r) = s.dims4()?;
    let k = targets.iter().map(|t| t.regions.len()).max().unwrap_or(0);
    if targets.is_empty() || k == 0 {
        return Ok(Tensor::zeros((), DType::F32, s.device())?);
    }
    let flat = s.reshape(b * p * b2 * r)?;
    let n = targets.len();
    let (mut idx, mut q, mut off) = (
        Vec::with_capacity(n * k),
        Vec::with_capacity(n * k),
        Vec::with_capacity(n * k),
    );
    for t in targets {
        let base = ((t.sample * p + t.phrase) * b2 + t.sample) * r;
        for j in 0..k {
            match t.regions.get(j) {
                Some(&reg) => {
                    idx.push((base + reg) as u32);
                    q.push(t.q[j]);
                    off.push(0f32);
                }
                None => {
                    idx.push(base as u32);
                    q.push(0.0);
                    off.push(-1e4);
                }
            }
        }
    }
    let dev = s.device();
    let student = flat
        .index_select(&Tensor::from_vec(idx, n * k, dev)?, 0)?
        .reshape((n, k))?;
    let student = ((student * scale)? + Tensor::from_vec(off, (n, k), dev)?)?;
    let logp = candle_nn::ops::log_softmax(&student, D::Minus1)?;
    let q = Tensor::from_vec(q, (n, k), dev)?;
    Ok((logp * q)?.sum_all()?.affine(-1.0 / n as f64, 0.0)?)
}

/// CKD's ramped distillation weight at global step `step`.
pub fn ramp(step: usize, every: usize, max: f64) -> f64 {
    (0.001 + (step / every.max(1)) as f64).min(max)
}

// ---------------------------------------------------------------- proposals

/// Proposals of every image a run reads, by image path as the records name it
/// (`proposals.json` in the run directory, rebuilt when the proposal settings change).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Proposals {
    pub config: ProposalConfig,
    pub images: BTreeMap<String, Vec<Box4>>,
}

impl Proposals {
    /// Loads the run's cache, adding the images of `sets` it lacks (two threads).
    pub fn load_or_build(
        run: &RunDir,
        cfg: &ProposalConfig,
        sets: &[&Dataset],
        progress: bool,
    ) -> Result<Self> {
        let path = run.file("proposals.json");
        let mut cache: Proposals = if path.is_file() {
            run.load_json("proposals.json")?
        } else {
            Proposals::default()
        };
        if &cache.config != cfg {
            cache = Proposals {
                config: cfg.clone(),
                images: BTreeMap::new(),
            };
        }
        let mut todo: Vec<(String, PathBuf)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for ds in sets {
            for r in &ds.records {
                if !cache.images.contains_key(&r.image) && seen.insert(r.image.as_str()) {
                    todo.push((r.image.clone(), resolve_image(&ds.image_root, &r.image)));
                }
            }
        }
        if todo.is_empty() {
            return Ok(cache);
        }
        let pb = crate::train::progress_bar(todo.len(), 0, progress);
        pb.set_message("region proposals");
        let done: Vec<Result<(String, Vec<Box4>)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = todo
                .chunks(todo.len().div_ceil(2))
                .map(|chunk| {
                    let pb = pb.clone();
                    sc.spawn(move || {
                        chunk
                            .iter()
                            .map(|(key, file)| {
                                let img = gk_data::image_io::load_rgb(file)?;
                                pb.inc(1);
                                Ok((key.clone(), propose(&img, cfg)))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        pb.finish_and_clear();
        for d in done {
            let (k, v) = d?;
            cache.images.insert(k, v);
        }
        run.save_json("proposals.json", &cache)?;
        Ok(cache)
    }
}

// ---------------------------------------------------------------- batches

/// One batch in CKD's form.
pub struct CkdBatch {
    /// `[B, R]` 1 = a proposal, 0 = padding.
    pub region_valid: Tensor,
    /// `[B, P]` 1 = a phrase, 0 = padding.
    pub phrase_valid: Tensor,
    /// Proposals per sample (pixel `xyxy` of the original image).
    pub boxes: Vec<Vec<Box4>>,
    pub phrases: Vec<Vec<Phrase>>,
    rois: Vec<Roi>,
    /// `[B * R]` row of each padded slot in the regions (padding: the extra zero row).
    slots: Tensor,
    /// `[B * P, Lp]` phrase tokens, padding phrases repeat the sample's first.
    phrase_ids: Tensor,
    phrase_mask: Tensor,
}

/// Proposals, phrases and their tokens for `batch` (an eval-transform batch: its frames
/// map the original image into the model's square).
pub fn ckd_batch(
    batch: &Batch,
    ds: &Dataset,
    proposals: &Proposals,
    tok: &TextTokenizer,
    model: &CkdModelConfig,
    max_phrases: usize,
) -> Result<CkdBatch> {
    let b = batch.len();
    let dev = batch.pixels.device();
    let boxes: Vec<Vec<Box4>> = batch
        .indices
        .iter()
        .map(|&i| {
            let r = &ds.records[i];
            proposals.images.get(&r.image).cloned().ok_or_else(|| {
                TrainError::Config(format!("no proposals for {} ({})", r.image, r.id))
            })
        })
        .collect::<Result<_>>()?;
    let rmax = boxes.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let side = model.image_size as f32;
    let (mut rois, mut slots, mut rv) = (Vec::new(), Vec::new(), Vec::new());
    let total: usize = boxes.iter().map(Vec::len).sum();
    for (k, bx) in boxes.iter().enumerate() {
        for j in 0..rmax {
            match bx.get(j) {
                Some(&p) => {
                    let c = gk_box::cxcywh_to_xyxy(batch.frames[k].to_model(p));
                    slots.push(rois.len() as u32);
                    rois.push(Roi {
                        batch: k,
                        xyxy: c.map(|v| v * side),
                    });
                    rv.push(1f32);
                }
                None => {
                    slots.push(total as u32);
                    rv.push(0.0);
                }
            }
        }
    }
    let phrases: Vec<Vec<Phrase>> = batch
        .indices
        .iter()
        .map(|&i| {
            let mut p = record_phrases(&ds.records[i]);
            p.truncate(max_phrases.max(1));
            p
        })
        .collect();
    let pmax = phrases.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let (mut ids, mut mask, mut pv) = (Vec::new(), Vec::new(), Vec::new());
    for ph in &phrases {
        for j in 0..pmax {
            let text = &ph.get(j).unwrap_or(&ph[0]).text;
            let enc = tok.encode(text, model.max_phrase_len)?;
            ids.extend(enc.ids);
            mask.extend(enc.mask.iter().map(|&m| m as f32));
            pv.push(if j < ph.len() { 1f32 } else { 0.0 });
        }
    }
    let lp = model.max_phrase_len;
    Ok(CkdBatch {
        region_valid: Tensor::from_vec(rv, (b, rmax), dev)?,
        phrase_valid: Tensor::from_vec(pv, (b, pmax), dev)?,
        boxes,
        phrases,
        rois,
        slots: Tensor::from_vec(slots, b * rmax, dev)?,
        phrase_ids: Tensor::from_vec(ids, (b * pmax, lp), dev)?,
        phrase_mask: Tensor::from_vec(mask, (b * pmax, lp), dev)?,
    })
}

/// The student on a batch: `s: [B, P, B, R]`.
pub fn forward(model: &CkdModel, batch: &Batch, cb: &CkdBatch) -> Result<Tensor> {
    let (b, rmax) = cb.region_valid.dims2()?;
    let pmax = cb.phrase_valid.dim(1)?;
    let regions = model.regions(&batch.pixels, &batch.pixel_mask, &cb.rois)?; // [Rtot, E]
    let e = regions.dim(1)?;
    let pad = Tensor::zeros((1, e), DType::F32, regions.device())?;
    let padded = Tensor::cat(&[regions, pad], 0)?
        .index_select(&cb.slots, 0)?
        .reshape((b, rmax, e))?;
    let phrases = model
        .phrases(&cb.phrase_ids, &cb.phrase_mask)?
        .reshape((b, pmax, e))?;
    region_phrase_scores(&phrases, &padded)
}

// ---------------------------------------------------------------- evaluation

/// Phrase localisation: a phrase is found at k when one of its k best proposals has IoU
/// >= 0.5 with its box.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhraseRecall {
    pub n: usize,
    pub hits: [usize; 3],
    /// Phrases with any proposal at IoU >= 0.5 (the proposals' upper bound).
    pub reachable: usize,
}

impl PhraseRecall {
    fn pct(&self, v: usize) -> f64 {
        100.0 * v as f64 / self.n.max(1) as f64
    }

    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({"n": self.n, "r1": self.pct(self.hits[0]), "r5": self.pct(self.hits[1]),
            "r10": self.pct(self.hits[2]), "upper_bound": self.pct(self.reachable)})
    }
}

/// A CKD evaluation: phrases, and whole expressions by their head phrase's top region.
#[derive(Debug, Clone, Default)]
pub struct CkdReport {
    pub phrases: PhraseRecall,
    pub expressions: EvalReport,
}

impl CkdReport {
    pub fn summary(&self) -> serde_json::Value {
        let mut v = self.expressions.summary();
        v["phrases"] = self.phrases.summary();
        v
    }
}

/// Evaluates over every batch of `loader` (an eval loader).
pub fn evaluate(
    model: &CkdModel,
    loader: &Loader,
    proposals: &Proposals,
    max_phrases: usize,
) -> Result<CkdReport> {
    let ds = loader.dataset();
    let mut rep = CkdReport::default();
    for batch in loader.epoch(0) {
        let batch = batch?;
        let cb = ckd_batch(
            &batch,
            ds,
            proposals,
            loader.tokenizer(),
            model.config(),
            max_phrases,
        )?;
        let s = forward(model, &batch, &cb)?;
        for (k, &i) in batch.indices.iter().enumerate() {
            let own = s.i((k, .., k))?.to_vec2::<f32>()?; // [P, R]
            let boxes = &cb.boxes[k];
            for (j, ph) in cb.phrases[k].iter().enumerate() {
                let mut order: Vec<usize> = (0..boxes.len()).collect();
                order.sort_by(|&a, &b| own[j][b].total_cmp(&own[j][a]));
                if let Some(gt) = ph.bbox {
                    let hit = |r: &usize| gk_box::iou(boxes[*r], gt).unwrap_or(0.0) >= 0.5;
                    rep.phrases.n += 1;
                    for (h, top) in [1, 5, 10].iter().enumerate() {
                        rep.phrases.hits[h] += order.iter().take(*top).any(hit) as usize;
                    }
                    rep.phrases.reachable += order.iter().any(hit) as usize;
                }
                if j == 0 {
                    let rec = &ds.records[i];
                    let pred = order.first().map_or([0.0; 4], |&r| boxes[r]);
                    let iou = gk_box::iou(pred, rec.bbox_xyxy).unwrap_or(0.0);
                    rep.expressions.all.add(iou, iou);
                    if let Some(ty) = ds.expr_type(i) {
                        rep.expressions
                            .by_type
                            .entry(ty.to_string())
                            .or_insert_with(Tally::default)
                            .add(iou, iou);
                    }
                    rep.expressions.predictions.push(crate::eval::Prediction {
                        index: i,
                        pred_px: pred,
                        iou,
                    });
                }
            }
        }
    }
    Ok(rep)
}

// ---------------------------------------------------------------- the run

/// Writes `config.toml` and `tokenizer.json` into a new CKD run directory.
pub fn prepare(dir: &Path, mut cfg: CkdRunConfig) -> Result<RunDir> {
    let run = RunDir::create(dir)?;
    let extra: Vec<String> = match &cfg.ckd.captions {
        Some(c) => crate::teacher::read_jsonl(c)?
            .iter()
            .filter_map(|r| r["caption"].as_str().map(String::from))
            .collect(),
        None => Vec::new(),
    };
    let tok = crate::train::run_tokenizer(&cfg.data, &mut cfg.model.text, &extra)?;
    if let Some(d) = &cfg.ckd.detector {
        // fail now, not after the proposals: the detector must exist and know the labels
        let det = TrainedDetector::open(d, &Device::Cpu)?;
        let labels = Labels::load(&cfg.ckd.labels)?;
        if det.meta.labels.classes != labels.classes {
            return Err(TrainError::Config(format!(
                "detector {} was trained on other classes than {}",
                d.display(),
                cfg.ckd.labels.display()
            )));
        }
    }
    crate::train::save_tokenizer(&run, &tok)?;
    run.save_config(&cfg)?;
    Ok(run)
}

/// A CKD student and its tokenizer, loaded from a run directory.
pub struct LoadedCkd {
    pub cfg: CkdRunConfig,
    pub model: CkdModel,
    pub map: VarMap,
    pub tok: TextTokenizer,
}

pub fn load_run(run: &RunDir, weights: Option<&str>, dev: &Device) -> Result<LoadedCkd> {
    let cfg: CkdRunConfig = run.load_config()?;
    let tok = TextTokenizer::from_file(&run.file("tokenizer.json"))?;
    let map = VarMap::new();
    let saved = match weights {
        Some(w) => crate::weights::read_safetensors(&run.file(w), dev)?,
        None => Default::default(),
    };
    let model = CkdModel::new(
        crate::init::var_builder_from(&map, cfg.seed, saved.clone(), dev),
        &cfg.model,
    )?;
    if let Some(w) = weights {
        crate::weights::check_exact(&map, &saved, &run.file(w))?;
    }
    Ok(LoadedCkd {
        cfg,
        model,
        map,
        tok,
    })
}

/// No augmentation, in training too: proposals belong to the original image.
fn loader(cfg: &CkdRunConfig, ds: Dataset, tok: &TextTokenizer, train: bool) -> Loader {
    let (side, len) = (cfg.model.image_size, cfg.model.max_phrase_len);
    crate::train::loader_for(&cfg.optim, cfg.seed, side, len, ds, tok, train, false)
}

/// An eval loader over `ds` with the run's settings.
pub fn eval_loader(cfg: &CkdRunConfig, ds: Dataset, tok: &TextTokenizer) -> Loader {
    loader(cfg, ds, tok, false)
}

/// Detector posteriors of every training image's proposals.
fn teacher_posteriors(
    det: &TrainedDetector,
    ds: &Dataset,
    proposals: &Proposals,
    progress: bool,
) -> Result<HashMap<String, Vec<Vec<f32>>>> {
    let mut images: Vec<&str> = ds.records.iter().map(|r| r.image.as_str()).collect();
    images.sort_unstable();
    images.dedup();
    let pb = crate::train::progress_bar(images.len(), 0, progress);
    pb.set_message("detector posteriors");
    let mut out = HashMap::new();
    for im in images {
        let img = gk_data::image_io::load_rgb(&resolve_image(&ds.image_root, im))?;
        let boxes = proposals.images.get(im).map(Vec::as_slice).unwrap_or(&[]);
        out.insert(im.to_string(), det.posteriors(&img, boxes)?);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(out)
}

/// The criterion of one batch: `nce` and, with a detector, `distill` at the ramped weight.
#[allow(clippy::too_many_arguments)]
pub fn criterion(
    cfg: &CkdConfig,
    s: &Tensor,
    cb: &CkdBatch,
    images: &[&str],
    classes: &ClassMap,
    posteriors: Option<&HashMap<String, Vec<Vec<f32>>>>,
    step: usize,
) -> Result<LossParts> {
    let mut parts = LossParts::new();
    let scores = image_sentence_scores(s, &cb.region_valid, &cb.phrase_valid, cfg.score_scale)?;
    let b = images.len();
    let exclude = if cfg.mask_same_image {
        let m: Vec<f32> = (0..b * b)
            .map(|x| {
                let (i, j) = (x / b, x % b);
                (i != j && images[i] == images[j]) as u8 as f32
            })
            .collect();
        Some(Tensor::from_vec(m, (b, b), s.device())?)
    } else {
        None
    };
    parts.push("nce", 1.0, nce_loss(&scores, exclude.as_ref())?);
    if let Some(post) = posteriors {
        let mut targets = Vec::new();
        for (i, im) in images.iter().enumerate() {
            let Some(p) = post.get(*im).filter(|p| !p.is_empty()) else {
                continue;
            };
            let own = s.i((i, .., i))?.to_vec2::<f32>()?;
            for (j, ph) in cb.phrases[i].iter().enumerate() {
                if let Some(c) = classes.class_of(&ph.text) {
                    let n = cb.boxes[i].len();
                    let (regions, q) = distill_targets(
                        &own[j][..n],
                        &cb.boxes[i],
                        p,
                        c,
                        cfg.distill_k,
                        cfg.teacher_norm,
                    );
                    targets.push(DistillTarget {
                        sample: i,
                        phrase: j,
                        regions,
                        q,
                    });
                }
            }
        }
        parts.push(
            "distill",
            ramp(step, cfg.ramp_every, cfg.ramp_max),
            distill_loss(s, &targets, cfg.student_scale)?,
        );
    }
    Ok(parts)
}

/// Trains (or resumes) a CKD run; returns the final state and the last validation report.
pub fn train(run: &RunDir, opts: &TrainOptions) -> Result<(TrainerState, CkdReport)> {
    let dev = Device::Cpu;
    run.recover_checkpoint()?;
    let LoadedCkd {
        cfg,
        model,
        map,
        tok,
    } = load_run(
        run,
        run.file("trainer_state.json")
            .is_file()
            .then_some("model.safetensors"),
        &dev,
    )?;
    let mut train_ds = training_set(&cfg)?;
    if cfg.data.train_fraction < 1.0 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        train_ds.records.shuffle(&mut rng);
        let keep = ((train_ds.len() as f64 * cfg.data.train_fraction).ceil() as usize)
            .max(cfg.optim.batch_size);
        train_ds.records.truncate(keep);
    }
    let val_ds = crate::train::load_set_with(&cfg.data, &cfg.data.val)?;
    let proposals = Proposals::load_or_build(
        run,
        &cfg.ckd.proposals,
        &[&train_ds, &val_ds],
        opts.progress,
    )?;
    let classes = ClassMap::new(&Labels::load(&cfg.ckd.labels)?);
    let posteriors = match &cfg.ckd.detector {
        Some(d) => {
            let det = TrainedDetector::open(d, &dev)?;
            Some(teacher_posteriors(
                &det,
                &train_ds,
                &proposals,
                opts.progress,
            )?)
        }
        None => None,
    };
    let train_loader = loader(&cfg, train_ds, &tok, true);
    let val_loader = eval_loader(&cfg, val_ds, &tok);
    let mut opt = AdamW::new(&map, &cfg.optim.groups, cfg.optim.weight_decay)?;
    let per_epoch = train_loader.batches_per_epoch();
    let mut steps = Steps::start(run, &cfg.optim, per_epoch, &mut opt, opts.progress, || {
        Ok(())
    })?;
    let mut last = CkdReport::default();
    let ds = train_loader.dataset();
    while steps.state.step < steps.total {
        let epoch = steps.epoch();
        for batch in train_loader.epoch_from(epoch as u64, steps.state.step % per_epoch) {
            let batch = batch?;
            // forward, loss, backward, step
            let cb = ckd_batch(
                &batch,
                ds,
                &proposals,
                &tok,
                &cfg.model,
                cfg.ckd.max_phrases,
            )?;
            let s = forward(&model, &batch, &cb)?;
            let images: Vec<&str> = batch
                .indices
                .iter()
                .map(|&i| ds.records[i].image.as_str())
                .collect();
            let parts = criterion(
                &cfg.ckd,
                &s,
                &cb,
                &images,
                &classes,
                posteriors.as_ref(),
                steps.state.step,
            )?;
            let loss = parts.total()?;
            let loss_v = loss.to_scalar::<f32>()?;
            let values = parts.values()?;
            if !loss_v.is_finite() {
                return Err(TrainError::NonFinite {
                    step: steps.state.step,
                    parts: crate::train::format_parts(&values),
                });
            }
            let mut grads = loss.backward()?;
            let grad_norm = opt.clip_grad_norm(&mut grads, cfg.optim.clip_grad)?;
            let lr = steps.lr(&cfg.optim);
            opt.step(&grads, lr)?;
            steps.logged(batch.len(), loss_v, lr, grad_norm, &values)?;

            // evaluation and checkpoints
            if steps.evaluates() {
                last = evaluate(&model, &val_loader, &proposals, cfg.ckd.max_phrases)?;
                steps.evaluated(&map, last.expressions.all.acc50(), last.summary())?;
            }
            if steps.checkpointed(&map, &opt, opts.stop_after)? {
                return Ok((steps.state, last));
            }
        }
    }
    Ok((steps.finish(), last))
}

/// Evaluates a CKD run's `weights` on each of `sets`: the model and the proposal cache are
/// loaded once, proposals of images not yet cached are added to it.
pub fn eval_run(
    run: &RunDir,
    weights: &str,
    sets: &[PathBuf],
    progress: bool,
) -> Result<Vec<CkdReport>> {
    let dev = Device::Cpu;
    let loaded = load_run(run, Some(weights), &dev)?;
    let sets = sets
        .iter()
        .map(|s| crate::train::load_set_with(&loaded.cfg.data, s))
        .collect::<Result<Vec<_>>>()?;
    let proposals = Proposals::load_or_build(
        run,
        &loaded.cfg.ckd.proposals,
        &sets.iter().collect::<Vec<_>>(),
        progress,
    )?;
    sets.into_iter()
        .map(|ds| {
            let l = eval_loader(&loaded.cfg, ds, &loaded.tok);
            evaluate(&loaded.model, &l, &proposals, loaded.cfg.ckd.max_phrases)
        })
        .collect()
}

// ---------------------------------------------------------------- prediction

/// A trained CKD student answering one query: proposals of the image, the head phrase of
/// the expression, its best region. Reads `config.toml`, `tokenizer.json` and the
/// student's weights; never the detector.
pub struct CkdPredictor {
    run: RunDir,
    loaded: LoadedCkd,
    info: crate::infer::ModelInfo,
    dev: Device,
}

/// One CKD answer.
#[derive(Debug, Clone, Serialize)]
pub struct CkdGrounding {
    /// Pixel `xyxy` of the best proposal.
    pub bbox_xyxy: Box4,
    /// The phrase that was grounded.
    pub phrase: String,
    /// `s(r, p)` of the chosen region.
    pub score: f32,
    /// The next best proposals and their scores.
    pub alternatives: Vec<(Box4, f32)>,
}

impl CkdPredictor {
    pub fn open(run: &RunDir) -> Result<Self> {
        let dev = Device::Cpu;
        let weights = crate::infer::serving_weights(run);
        let loaded = load_run(run, Some(weights), &dev)?;
        let parameters = loaded.map.all_vars().iter().map(|v| v.elem_count()).sum();
        let info = crate::infer::ModelInfo {
            kind: "ckd".into(),
            run: run.path().to_path_buf(),
            weights: run.file(weights),
            image_size: loaded.cfg.model.image_size as u32,
            max_text_len: loaded.cfg.model.max_phrase_len,
            parameters,
            batch_dependent: None,
            data: loaded.cfg.data.clone(),
        };
        Ok(Self {
            run: run.clone(),
            loaded,
            info,
            dev,
        })
    }

    pub fn predict(&self, image: &image::RgbImage, expr: &str) -> Result<CkdGrounding> {
        if expr.trim().is_empty() {
            return Err(gk_data::DataError::EmptyText.into());
        }
        let cfg = &self.loaded.cfg;
        let boxes = propose(image, &cfg.ckd.proposals);
        if boxes.is_empty() {
            return Err(TrainError::Config(
                "the image gave no region proposals".into(),
            ));
        }
        let side = cfg.model.image_size as u32;
        let lb = gk_data::image_io::letterbox(
            image,
            side,
            cfg.optim.augment.resize,
            &cfg.optim.augment.normalize,
            &self.dev,
        )?;
        let rois: Vec<Roi> = boxes
            .iter()
            .map(|&p| Roi {
                batch: 0,
                xyxy: gk_box::cxcywh_to_xyxy(lb.frame.to_model(p)).map(|v| v * side as f32),
            })
            .collect();
        let regions =
            self.loaded
                .model
                .regions(&lb.pixels.unsqueeze(0)?, &lb.mask.unsqueeze(0)?, &rois)?;
        let phrase = gk_data::phrases::chunk(expr)
            .into_iter()
            .next()
            .unwrap_or_else(|| expr.to_lowercase());
        let (ids, mask, _) = crate::predict::encode_one(
            &self.loaded.tok,
            &phrase,
            cfg.model.max_phrase_len,
            &self.dev,
        )?;
        let p = self.loaded.model.phrases(&ids, &mask)?; // [1, E]
        let scores = regions.matmul(&p.t()?)?.squeeze(1)?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..boxes.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        Ok(CkdGrounding {
            bbox_xyxy: boxes[order[0]],
            phrase,
            score: scores[order[0]],
            alternatives: order[1..]
                .iter()
                .take(4)
                .map(|&r| (boxes[r], scores[r]))
                .collect(),
        })
    }
}

impl crate::infer::GroundingModel for CkdPredictor {
    fn info(&self) -> &crate::infer::ModelInfo {
        &self.info
    }

    /// Phrase recall over the set's phrases (proposals cached in the run).
    fn set_metrics(&self, ds: &Dataset) -> Result<serde_json::Map<String, serde_json::Value>> {
        let cfg = &self.loaded.cfg;
        let proposals = Proposals::load_or_build(&self.run, &cfg.ckd.proposals, &[ds], false)?;
        let loader = eval_loader(cfg, ds.clone(), &self.loaded.tok);
        let r = evaluate(&self.loaded.model, &loader, &proposals, cfg.ckd.max_phrases)?;
        let mut m = serde_json::Map::new();
        m.insert("phrases".into(), r.phrases.summary());
        Ok(m)
    }

    /// Query by query: each image has its own proposals.
    fn ground(&self, queries: &[crate::infer::Query<'_>]) -> Result<Vec<crate::infer::Answer>> {
        let side = self.info.image_size;
        queries
            .iter()
            .map(|q| {
                let g = self.predict(q.image, q.expr)?;
                let (w, h) = q.image.dimensions();
                let frame = gk_box::Letterbox::centred(w, h, side);
                Ok(crate::infer::Answer {
                    bbox_xyxy: g.bbox_xyxy,
                    model_cxcywh: frame.to_model(g.bbox_xyxy),
                    frame,
                    truncated: false,
                    score: Some(g.score),
                    phrase: Some(g.phrase),
                })
            })
            .collect()
    }
}
