//! The run config and the training loop (reads top to bottom, nanoGPT style).
//!
//! `prepare` makes a run directory from a config (tokenizer resolved and saved, text
//! vocabulary size fixed to it); `train` runs or resumes it: every `eval_every` steps it
//! evaluates on the validation set, keeps `best.safetensors`, and writes the last weights,
//! optimiser moments and `trainer_state.json` atomically, so `train` on an interrupted
//! run continues exactly where the last checkpoint left off.

use crate::distill::{distill_losses, DistillConfig, DistillHeads};
use crate::error::{Result, TrainError};
use crate::eval::{evaluate, EvalReport, GtBoxes};
use crate::losses::{box_losses, dense_losses, BoxLossConfig, LossParts};
use crate::optim::{lr_factor, AdamW, ParamGroup, Schedule};
use crate::run::RunDir;
use crate::teacher::{CacheStatus, FeatureCache, Teacher, TeacherFeatures};
use candle_core::Device;
use candle_nn::VarMap;
use gk_data::batch::{Loader, LoaderConfig};
use gk_data::dataset::{Dataset, LoadOptions};
use gk_data::tokenize::{self, TextTokenizer};
use gk_data::transforms::TransformConfig;
use gk_models::grounder::{Grounder, GrounderConfig, TextConfig};
use gk_models::nn::Mode;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Where the data is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    pub train: PathBuf,
    pub val: PathBuf,
    /// More sets evaluated after training (e.g. testA, testB).
    #[serde(default)]
    pub test: Vec<PathBuf>,
    /// Folder the records' image paths are relative to (default: each JSONL's folder).
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// `"word-level"` (built from the training expressions) or a `tokenizer.json` path.
    pub tokenizer: String,
    /// Skip bad records (counted) instead of stopping.
    #[serde(default)]
    pub skip_bad: bool,
    /// Train on this fraction of the training set (low-data experiments).
    #[serde(default = "one")]
    pub train_fraction: f64,
}

fn one() -> f64 {
    1.0
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub batch_size: usize,
    pub epochs: usize,
    pub lr: f64,
    /// Per-prefix LR scales (first match wins; unmatched parameters use 1).
    #[serde(default)]
    pub groups: Vec<ParamGroup>,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// Max global gradient norm (0 = off).
    pub clip_grad: f64,
    /// Evaluate and checkpoint every N steps (0 = at each epoch end).
    #[serde(default)]
    pub eval_every: usize,
    pub workers: usize,
    pub augment: TransformConfig,
    /// Batch each training image's expressions together and encode each image once per
    /// batch ([`gk_data::batch::Loader::grouped`]): one augmentation draw per image, and a
    /// query-independent backbone runs once for ~3 expressions on the benchmark.
    #[serde(default)]
    pub group_images: bool,
}

/// Pretrained weights loaded into a fresh model before training: every tensor of `file`
/// named `from + rest` goes to parameter `to + rest` (e.g. `vision_model.` -> `visual.`
/// for a Hugging Face CLIP file). Strict loads fail on any missing, unexpected or wrongly
/// shaped tensor and name them all; non-strict loads skip those and print them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainedConfig {
    pub file: PathBuf,
    pub from: String,
    pub to: String,
    #[serde(default = "yes")]
    pub strict: bool,
    #[serde(default)]
    pub format: PretrainedFormat,
}

/// What kind of file a `[[pretrained]]` entry reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PretrainedFormat {
    /// safetensors, names mapped by `from` -> `to`.
    #[default]
    Safetensors,
    /// An mmdet Swin detector checkpoint (`.pth`, QRNet's released Mask R-CNN): its Swin
    /// backbone, output norms and FPN laterals into the QRNet visual encoder at `to`
    /// (`visual.`; `from` is not used); strictness covers those parts, not QRNet's own
    /// query-aware layers ([`crate::import::mmdet_swin_backbone`]).
    MmdetSwin,
}

fn yes() -> bool {
    true
}

/// Everything a run needs; saved as `config.toml` in the run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub seed: u64,
    pub model: GrounderConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub loss: BoxLossConfig,
    #[serde(default)]
    pub pretrained: Vec<PretrainedConfig>,
    /// Start the position tables from sine-cosine codes (see `init::sincos_positions`).
    #[serde(default)]
    pub sincos_positions: bool,
    /// Distillation from a CLIP-style teacher (EpmVG); absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// HiVG's HiLoRA stages (`groundkit train` runs them in sequence; `hilora::train_stages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hilora: Option<crate::hilora::HiLoraConfig>,
}

impl RunConfig {
    /// The demo recipe on a benchmark written by `groundkit synth` into `data`.
    pub fn synth(data: &std::path::Path, epochs: usize) -> Self {
        let model = GrounderConfig::synth_small();
        Self {
            seed: 0,
            data: DataConfig {
                train: data.join("train.jsonl"),
                val: data.join("val.jsonl"),
                test: ["testA", "testB", "heldout"]
                    .iter()
                    .map(|s| data.join(format!("{s}.jsonl")))
                    .collect(),
                image_root: None,
                tokenizer: "word-level".into(),
                skip_bad: false,
                train_fraction: 1.0,
            },
            optim: OptimConfig {
                batch_size: 32,
                epochs,
                lr: 1e-3,
                groups: Vec::new(),
                weight_decay: 1e-4,
                warmup_steps: 100,
                schedule: Schedule::Cosine { min_ratio: 0.02 },
                clip_grad: 1.0,
                eval_every: 0,
                workers: 1,
                group_images: true,
                augment: TransformConfig {
                    side: model.image_size as u32,
                    flip: 0.5,
                    crop: 0.0,
                    jitter: 0.1,
                    min_scale: 1.0,
                    translate: false,
                    ..TransformConfig::default()
                },
            },
            model,
            loss: BoxLossConfig {
                words: 10.0,
                ..BoxLossConfig::default()
            },
            pretrained: Vec::new(),
            distill: None,
            hilora: None,
            sincos_positions: true,
        }
    }
}

/// Progress of a run; `trainer_state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Best validation Acc@0.5 so far and its step.
    pub best_acc: f64,
    pub best_step: usize,
    pub finished: bool,
}

/// Knobs that are not part of the experiment.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Stop (with a checkpoint) after this many steps in total: simulates an interruption.
    pub stop_after: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Writes `config.toml` and `tokenizer.json` into a new run directory. A word-level
/// tokenizer is built from the training expressions and the text encoder's vocabulary
/// is sized to it.
pub fn prepare(dir: &std::path::Path, mut cfg: RunConfig) -> Result<RunDir> {
    let run = RunDir::create(dir)?;
    let tok = run_tokenizer(&cfg.data, &mut cfg.model.text, &[])?
        .with_pad_override(cfg.model.layout.pad_id);
    if let Some(d) = &mut cfg.distill {
        // The student-side projections are sized by the teacher: read it now, check it at training.
        let clip = crate::teacher::read_config(&d.teacher)?;
        d.teacher_dim = clip.projection_dim;
    }
    save_tokenizer(&run, &tok)?;
    run.save_config(&cfg)?;
    Ok(run)
}

/// A `[[pretrained]]` mmdet Swin detector into the QRNet at `p.to`: its backbone, output
/// norms and laterals (strict over those three when `p.strict`); the detector's heads are
/// printed as unused.
fn load_mmdet_swin(map: &VarMap, p: &PretrainedConfig) -> Result<crate::weights::LoadReport> {
    let det = crate::import::mmdet_swin_backbone(&p.file)?;
    let tensors = det
        .tensors
        .into_iter()
        .map(|(k, t)| (format!("{}{k}", p.to), t))
        .collect();
    let parts = ["swin.", "out_norm.", "lateral."].map(|s| format!("{}{s}", p.to));
    let prefixes: Vec<(&str, &str)> = parts.iter().map(|s| (s.as_str(), s.as_str())).collect();
    let report = crate::weights::load_tensors(map, &tensors, &p.file, &prefixes, p.strict)?;
    eprintln!(
        "{}: Swin embed {} depths {:?} heads {:?}; {} detector keys not used (heads, FPN convs, buffers)",
        p.file.display(),
        det.embed_dim,
        det.depths,
        det.heads,
        det.unused.len()
    );
    Ok(report)
}

/// The run's tokenizer: word-level from the training expressions and `extra` texts (the
/// text encoder's vocabulary is then sized to it) or a `tokenizer.json`, which must fit
/// the encoder.
pub fn run_tokenizer(
    data: &DataConfig,
    text: &mut TextConfig,
    extra: &[String],
) -> Result<TextTokenizer> {
    let tok = if data.tokenizer == "word-level" {
        let ds = Dataset::load(
            &data.train,
            data.image_root.as_deref(),
            &LoadOptions {
                skip_bad: data.skip_bad,
                check_images: false,
            },
        )?;
        tokenize::word_level(
            ds.records
                .iter()
                .map(|r| r.expr.as_str())
                .chain(extra.iter().map(String::as_str)),
        )?
    } else {
        TextTokenizer::from_file(std::path::Path::new(&data.tokenizer))?
    };
    let vocab = tok.vocab_size();
    match text {
        TextConfig::Bert(b) if data.tokenizer == "word-level" => b.vocab_size = vocab,
        TextConfig::Bert(b) if b.vocab_size < vocab => {
            return Err(TrainError::Config(format!(
                "tokenizer has {vocab} ids but the text encoder only {}",
                b.vocab_size
            )))
        }
        TextConfig::ClipText(c) if c.vocab_size < vocab => {
            return Err(TrainError::Config(format!(
                "tokenizer has {vocab} ids but the text encoder only {}",
                c.vocab_size
            )))
        }
        _ => {}
    }
    Ok(tok)
}

/// Writes the run's `tokenizer.json`.
pub fn save_tokenizer(run: &RunDir, tok: &TextTokenizer) -> Result<()> {
    tok.inner()
        .save(run.file("tokenizer.json"), false)
        .map_err(|e| TrainError::Format {
            path: run.file("tokenizer.json"),
            msg: e.to_string(),
        })
}

/// A model and its tokenizer, loaded from a run directory.
pub struct Loaded {
    pub cfg: RunConfig,
    pub model: Grounder,
    pub map: VarMap,
    pub tok: TextTokenizer,
    /// The student-side distillation projections (training only; built so that strict
    /// loads of a distilled run's weights match).
    pub distill: Option<DistillHeads>,
}

/// Builds the run's model; loads `weights` (e.g. `best.safetensors`) if given.
pub fn load_run(run: &RunDir, weights: Option<&str>, dev: &Device) -> Result<Loaded> {
    let cfg: RunConfig = run.load_config()?;
    let tok = TextTokenizer::from_file(&run.file("tokenizer.json"))?
        .with_pad_override(cfg.model.layout.pad_id);
    let map = VarMap::new();
    let saved = match weights {
        Some(w) => crate::weights::read_safetensors(&run.file(w), dev)?,
        None => Default::default(),
    };
    // parameters come from the saved tensors when there are some: nothing is drawn
    let vb = crate::init::var_builder_from(&map, cfg.seed, saved.clone(), dev);
    let model = Grounder::new(vb.clone(), &cfg.model).map_err(|e| weights_err(run, weights, e))?;
    let distill = match &cfg.distill {
        Some(d) => Some(DistillHeads::new(
            vb.pp("distill"),
            cfg.model.visual_dim(),
            cfg.model.text_dim(),
            cfg.model.fusion.hidden,
            d.teacher_dim,
        )?),
        None => None,
    };
    if let Some(w) = weights {
        crate::weights::check_exact(&map, &saved, &run.file(w))?;
    }
    Ok(Loaded {
        cfg,
        model,
        map,
        tok,
        distill,
    })
}

/// A model that could not be built from a run's weights (a shape that differs from the
/// config): the error names the file.
fn weights_err(run: &RunDir, weights: Option<&str>, e: candle_core::Error) -> TrainError {
    match weights {
        Some(w) => TrainError::Format {
            path: run.file(w),
            msg: format!("does not fit the run's config.toml: {e}"),
        },
        None => e.into(),
    }
}

/// The model `cfg` on `map`'s current weights detached from the autograd graph
/// ([`crate::init::detached_var_builder`]): its forwards keep only what they still need.
fn inference_model(map: &VarMap, cfg: &GrounderConfig, dev: &Device) -> Result<Grounder> {
    Ok(Grounder::new(
        crate::init::detached_var_builder(map, dev),
        cfg,
    )?)
}

/// [`load_run`] with `weights` for inference (evaluation, prediction): the model is
/// [`inference_model`] on the loaded weights.
pub fn load_inference(run: &RunDir, weights: &str, dev: &Device) -> Result<Loaded> {
    let mut loaded = load_run(run, Some(weights), dev)?;
    loaded.model = inference_model(&loaded.map, &loaded.cfg.model, dev)?;
    Ok(loaded)
}

/// A loader over `ds` with the run's settings: training (shuffled, augmented, whole
/// batches only) or evaluation (fixed order, eval transform, every sample).
pub fn make_loader(cfg: &RunConfig, ds: Dataset, tok: &TextTokenizer, train: bool) -> Loader {
    let (side, len) = (cfg.model.image_size, cfg.model.max_text_len);
    loader_for(&cfg.optim, cfg.seed, side, len, ds, tok, train, train)
}

/// A loader from the optimiser settings: `train` shuffles whole batches, `augment` applies
/// the training transform (else the eval transform with the same normalisation).
#[allow(clippy::too_many_arguments)]
pub fn loader_for(
    optim: &OptimConfig,
    seed: u64,
    side: usize,
    max_text_len: usize,
    ds: Dataset,
    tok: &TextTokenizer,
    train: bool,
    augment: bool,
) -> Loader {
    Loader::new(
        Arc::new(ds),
        Arc::new(tok.clone()),
        LoaderConfig {
            batch_size: if train {
                optim.batch_size
            } else {
                optim.batch_size.max(16)
            },
            shuffle: train,
            drop_last: train,
            workers: optim.workers,
            seed,
            train: augment,
            transform: TransformConfig {
                side: side as u32,
                ..optim.augment.clone()
            },
            max_text_len,
        },
    )
}

/// An eval loader (no augmentation, fixed order).
pub fn eval_loader(cfg: &RunConfig, ds: Dataset, tok: &TextTokenizer) -> Loader {
    make_loader(cfg, ds, tok, false)
}

/// Loads a JSONL set with the run's data options.
pub fn load_set(cfg: &RunConfig, path: &std::path::Path) -> Result<Dataset> {
    load_set_with(&cfg.data, path)
}

/// Loads a JSONL set with these data options.
pub fn load_set_with(data: &DataConfig, path: &std::path::Path) -> Result<Dataset> {
    Ok(Dataset::load(
        path,
        data.image_root.as_deref(),
        &LoadOptions {
            skip_bad: data.skip_bad,
            check_images: data.skip_bad,
        },
    )?)
}

/// `name=value, ...` of loss parts (logs, errors).
pub fn format_parts(values: &[(String, f32)]) -> String {
    values
        .iter()
        .map(|(n, v)| format!("{n}={v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The criterion: named loss parts of one batch.
pub fn criterion(
    cfg: &RunConfig,
    out: &gk_models::grounder::GrounderOutput,
    target: &candle_core::Tensor,
    ids: &candle_core::Tensor,
) -> Result<LossParts> {
    let mut parts = LossParts::new();
    match &out.cells {
        Some((scores, boxes)) => dense_losses(
            scores,
            boxes,
            out.visual.grid,
            target,
            &cfg.loss,
            &mut parts,
        )?,
        None => box_losses(&out.pred_box, target, &cfg.loss, &mut parts)?,
    }
    if let Some(aux) = &out.aux {
        crate::losses::hivg_aux_losses(aux, out.visual.grid, target, &cfg.loss, &mut parts)?;
    }
    match (&out.word_logits, cfg.loss.words > 0.0) {
        (Some(logits), true) => parts.push(
            "words",
            cfg.loss.words,
            crate::losses::word_bag_loss(logits, out.visual.grid, target, ids)?,
        ),
        (None, true) => {
            return Err(TrainError::Config(
                "[loss] words needs a grounder with word_head = true".into(),
            ))
        }
        _ => {}
    }
    match (&out.clip, cfg.loss.contrastive > 0.0) {
        (Some(c), true) => parts.push(
            "contrastive",
            cfg.loss.contrastive,
            crate::distill::info_nce(&c.image, &c.text, &c.scale)?,
        ),
        (None, true) => {
            return Err(TrainError::Config(
                "[loss] contrastive needs a HiVG grounder with contrastive_dim > 0".into(),
            ))
        }
        _ => {}
    }
    Ok(parts)
}

pub(crate) fn progress_bar(total: usize, done: usize, show: bool) -> indicatif::ProgressBar {
    let pb = if show {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} steps  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(done as u64);
    pb
}

/// What every training loop shares (`train` here, `ckd::train`): the step counts, the
/// resume from the last checkpoint, logging every 10 steps with the progress bar, the
/// evaluation bookkeeping (`best.safetensors`) and the atomic checkpoint.
pub(crate) struct Steps<'a> {
    run: &'a RunDir,
    pub per_epoch: usize,
    pub total: usize,
    eval_every: usize,
    pub state: TrainerState,
    window: (usize, Instant),
    pb: indicatif::ProgressBar,
}

impl<'a> Steps<'a> {
    /// Resumes from `run`'s checkpoint into `map` and `opt` when there is one; `fresh`
    /// initialises a new run otherwise.
    pub fn start(
        run: &'a RunDir,
        optim: &OptimConfig,
        per_epoch: usize,
        opt: &mut AdamW,
        progress: bool,
        fresh: impl FnOnce() -> Result<()>,
    ) -> Result<Self> {
        if per_epoch == 0 {
            return Err(TrainError::Config(format!(
                "training set smaller than one batch of {}",
                optim.batch_size
            )));
        }
        let total = per_epoch * optim.epochs;
        let mut state = TrainerState {
            total_steps: total,
            ..TrainerState::default()
        };
        if run.file("trainer_state.json").is_file() {
            // (the model was built from model.safetensors: `load_run`)
            state = run.load_json("trainer_state.json")?;
            opt.load(&run.file("optim.safetensors"), state.step)?;
        } else {
            fresh()?;
        }
        Ok(Self {
            run,
            per_epoch,
            total,
            eval_every: if optim.eval_every == 0 {
                per_epoch
            } else {
                optim.eval_every
            },
            pb: progress_bar(total, state.step, progress && !state.finished),
            state,
            window: (0, Instant::now()),
        })
    }

    pub fn epoch(&self) -> usize {
        self.state.step / self.per_epoch
    }

    /// The learning rate of the current step.
    pub fn lr(&self, optim: &OptimConfig) -> f64 {
        optim.lr
            * lr_factor(
                optim.schedule,
                self.state.step,
                self.total,
                optim.warmup_steps,
            )
    }

    /// Counts a finished step of `samples` and logs it.
    pub fn logged(
        &mut self,
        samples: usize,
        loss: f32,
        lr: f64,
        grad_norm: f64,
        values: &[(String, f32)],
    ) -> Result<()> {
        let epoch = self.epoch();
        self.state.step += 1;
        let step = self.state.step;
        self.window.0 += samples;
        let secs = self.window.1.elapsed().as_secs_f64();
        let rate = self.window.0 as f64 / secs.max(1e-9);
        let mut log = serde_json::json!({"event": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm});
        for (n, v) in values {
            log[n.as_str()] = serde_json::json!(v);
        }
        if step.is_multiple_of(10) || step == self.total {
            log["samples_per_s"] = serde_json::json!(rate);
            self.run.log_metrics(&log)?;
            self.window = (0, Instant::now());
        }
        let msg = values
            .iter()
            .map(|(n, v)| format!("{n} {v:.3}"))
            .collect::<Vec<_>>()
            .join("  ");
        self.pb.set_message(format!(
            "loss {loss:.3} ({msg})  {rate:.0} samples/s  best {:.1}%",
            self.state.best_acc
        ));
        self.pb.set_position(step as u64);
        Ok(())
    }

    /// Whether this step evaluates (and checkpoints).
    pub fn evaluates(&self) -> bool {
        self.state.step.is_multiple_of(self.eval_every) || self.state.step == self.total
    }

    /// Logs a validation `summary` with its Acc@0.5 and keeps the best weights.
    pub fn evaluated(&mut self, map: &VarMap, acc: f64, summary: serde_json::Value) -> Result<()> {
        let epoch = (self.state.step - 1) / self.per_epoch;
        self.run.log_metrics(&serde_json::json!({"event": "eval", "step": self.state.step, "epoch": epoch, "val": summary}))?;
        if acc > self.state.best_acc || self.state.best_step == 0 {
            self.state.best_acc = acc;
            self.state.best_step = self.state.step;
            self.run.save_weights(map, "best.safetensors")?;
        }
        Ok(())
    }

    /// Writes the checkpoint when this step evaluates or `stop`s; true when the loop must
    /// stop (`stop_after` reached).
    pub fn checkpointed(
        &mut self,
        map: &VarMap,
        opt: &AdamW,
        stop_after: Option<usize>,
    ) -> Result<bool> {
        let stop = stop_after.is_some_and(|s| self.state.step >= s);
        if stop || self.evaluates() {
            self.state.finished = self.state.step == self.total;
            let weights = |p: &std::path::Path| crate::weights::save_atomic(map, p);
            let moments = |p: &std::path::Path| opt.save(p);
            self.run.save_checkpoint(
                self.state.step,
                &[
                    ("model.safetensors", &weights),
                    ("optim.safetensors", &moments),
                ],
                &self.state,
            )?;
        }
        if stop {
            self.pb.finish_and_clear();
        }
        Ok(stop)
    }

    pub fn finish(self) -> TrainerState {
        self.pb.finish_and_clear();
        self.state
    }
}

/// The dropout seed of training step `step`: a function of the run seed and the step only,
/// so a resumed step draws the masks the uninterrupted run drew.
pub fn dropout_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64
}

/// Trains (or resumes) the run in `run`. Returns the final state and the last validation report.
pub fn train(run: &RunDir, opts: &TrainOptions) -> Result<(TrainerState, EvalReport)> {
    let dev = Device::Cpu;
    // a resumed run is built from its last checkpoint (nothing drawn), once a checkpoint
    // that a kill interrupted is rolled back or forward
    run.recover_checkpoint()?;
    let resuming = run.file("trainer_state.json").is_file();
    let Loaded {
        cfg,
        model,
        map,
        tok,
        distill: heads,
    } = load_run(run, resuming.then_some("model.safetensors"), &dev)?;

    // data
    let mut train_ds = load_set(&cfg, &cfg.data.train)?;
    if cfg.data.train_fraction < 1.0 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        train_ds.records.shuffle(&mut rng);
        let keep = ((train_ds.len() as f64 * cfg.data.train_fraction).ceil() as usize)
            .max(cfg.optim.batch_size);
        train_ds.records.truncate(keep);
    }
    let distill = match (&cfg.distill, heads) {
        (Some(d), Some(heads)) => {
            let teacher = Teacher::open(&d.teacher, &dev)?;
            if teacher.dim != d.teacher_dim {
                return Err(TrainError::Config(format!(
                    "teacher {} embeds in {} dimensions, the run was prepared for {}",
                    d.teacher.display(),
                    teacher.dim,
                    d.teacher_dim
                )));
            }
            let features = if d.live {
                TeacherFeatures::Live {
                    teacher,
                    norm: cfg.optim.augment.normalize,
                }
            } else {
                let (cache, status) = FeatureCache::load_or_build(
                    &teacher,
                    &d.teacher,
                    &train_ds,
                    d.duet_self > 0.0,
                    |_, _| {},
                )?;
                if opts.progress || matches!(status, CacheStatus::Rebuilt(_)) {
                    eprintln!("teacher features of the training set: {status:?}");
                }
                TeacherFeatures::Cached(cache)
            };
            Some((d.clone(), heads, features))
        }
        _ => None,
    };
    let train_loader = make_loader(&cfg, train_ds, &tok, true).grouped(cfg.optim.group_images);
    let val_loader = eval_loader(&cfg, load_set(&cfg, &cfg.data.val)?, &tok);

    // optimiser and state (resume if a checkpoint exists)
    let mut opt = AdamW::new(&map, &cfg.optim.groups, cfg.optim.weight_decay)?;
    let per_epoch = train_loader.batches_per_epoch();
    let mut steps = Steps::start(run, &cfg.optim, per_epoch, &mut opt, opts.progress, || {
        if cfg.sincos_positions {
            crate::init::sincos_positions(&map, &cfg.model)?;
        }
        for p in &cfg.pretrained {
            let report = match p.format {
                PretrainedFormat::Safetensors => crate::weights::load_prefixed(
                    &map,
                    &p.file,
                    &[(p.from.as_str(), p.to.as_str())],
                    p.strict,
                )?,
                PretrainedFormat::MmdetSwin => load_mmdet_swin(&map, p)?,
            };
            if opts.progress || !report.is_clean() {
                eprintln!("{}: {report}", p.file.display());
            }
        }
        Ok(())
    })?;
    let mut last_report = EvalReport::default();
    while steps.state.step < steps.total {
        let epoch = steps.epoch();
        for batch in train_loader.epoch_from(epoch as u64, steps.state.step % per_epoch) {
            let batch = batch?;
            // forward, loss, backward, clip, step
            let out = model.forward_indexed(
                &batch.pixels,
                &batch.pixel_mask,
                batch.image_index.as_ref(),
                &batch.ids,
                &batch.text_mask,
                Mode::Train {
                    seed: dropout_seed(cfg.seed, steps.state.step),
                },
            )?;
            if !out.pred_box.sum_all()?.to_scalar::<f32>()?.is_finite() {
                return Err(TrainError::NonFinite {
                    step: steps.state.step,
                    parts: "the predicted boxes hold NaN or inf".into(),
                });
            }
            let mut parts = criterion(&cfg, &out, &batch.target, &batch.ids)?;
            if let Some((d, heads, features)) = &distill {
                let teacher = features.batch(train_loader.dataset(), &batch, d.duet_self > 0.0)?;
                distill_losses(
                    d,
                    heads,
                    &out,
                    &batch.text_mask,
                    &batch.target,
                    &teacher,
                    &mut parts,
                )?;
            }
            let loss = parts.total()?;
            let loss_v = loss.to_scalar::<f32>()?;
            let values = parts.values()?;
            if !loss_v.is_finite() {
                return Err(TrainError::NonFinite {
                    step: steps.state.step,
                    parts: format_parts(&values),
                });
            }
            let mut grads = loss.backward()?;
            let grad_norm = opt.clip_grad_norm(&mut grads, cfg.optim.clip_grad)?;
            let lr = steps.lr(&cfg.optim);
            opt.step(&grads, lr)?;
            steps.logged(batch.len(), loss_v, lr, grad_norm, &values)?;

            // evaluation and checkpoints
            if steps.evaluates() {
                let frozen = inference_model(&map, &cfg.model, &dev)?;
                last_report = evaluate(&frozen, &val_loader, GtBoxes::Stored, |_| {})?;
                steps.evaluated(&map, last_report.all.acc50(), last_report.summary())?;
            }
            if steps.checkpointed(&map, &opt, opts.stop_after)? {
                return Ok((steps.state, last_report));
            }
        }
    }
    Ok((steps.finish(), last_report))
}
