//! Importers of released checkpoints: a published model's torch file in, an ordinary run
//! folder out (`config.toml` with the model kind's preprocessing and recipe,
//! `tokenizer.json`, `best.safetensors`, `import.json`), which `eval`, `predict`, `serve`
//! and fine-tuning (`train --init-from`) take like any trained run.
//!
//! Every importer reads the file with the code-free torch reader ([`gk_data::pth`]), tensor
//! by tensor, and only its `model` entry (never `optimizer` or `lr_scheduler`); derives the
//! config from the tensor shapes (and the saved `args` for what shapes cannot tell); says
//! how each of our parameters is made from the file ([`Source`]: a tensor as stored, rows
//! of a packed projection, a transpose, or a LoRA pair merged into its base); and then
//! [`plan`] checks that against what the model asks for: missing or wrong-shaped
//! parameters are one error naming them all, unused checkpoint keys are listed.
//!
//! - [`transvg`]: TransVG (`djiajunustc/TransVG`), ResNet + DETR + BERT.
//! - [`clip`]: HiVG (`linhuixiao/HiVG`, HF CLIP with peft 0.3 LoRA and the bridges) and
//!   CLIP-VG (`linhuixiao/CLIP-VG`, OpenAI CLIP in half precision).
//! - [`mmdet`]: not a grounder: the Swin backbone and FPN laterals of an mmdet Mask R-CNN
//!   (QRNet's released detectors), to initialise a QRNet before training.

mod clip;
mod mmdet;
mod transvg;

pub use clip::{import_clipvg, import_hivg, HivgImport};
pub use mmdet::{mmdet_swin_backbone, MmdetBackbone};
pub use transvg::{import_transvg, transvg_config, transvg_key, transvg_optim};

use crate::error::{Result, TrainError};
use crate::run::RunDir;
use crate::train::{DataConfig, OptimConfig, RunConfig};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use gk_data::pickle::Value;
use gk_data::pth::{self, TensorRef, TorchFile};
use gk_data::tokenize::TextTokenizer;
use gk_models::grounder::{Grounder, GrounderConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// `(name, shape)` of every tensor of a state dict, in file order.
pub type Shapes = Vec<(String, Vec<usize>)>;

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub source: PathBuf,
    pub container: String,
    /// Parameters written and the number of values they hold.
    pub tensors: usize,
    pub values: usize,
    /// Checkpoint keys the model does not use (TransVG: none; HiVG: the heads of its
    /// training losses, CLIP's `position_ids` buffers, ...).
    pub unused: Vec<String>,
    /// LoRA pairs merged into their base weights (`W + scale · B·A`), or kept as a LoRA
    /// set, and the scale.
    pub lora_merged: usize,
    pub lora_kept: usize,
    pub lora_scale: Option<f32>,
    /// The checkpoint's `args` (argparse.Namespace) as JSON, if it had them.
    pub args: serde_json::Value,
    /// `epoch` and `val_accu` as saved.
    pub epoch: Option<i64>,
    pub val_accu: Option<f64>,
    pub config: GrounderConfig,
}

fn format_err(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The checkpoint's `args` as `name -> value` (an argparse.Namespace or a dict).
fn args_of(top: &Value) -> BTreeMap<String, Value> {
    match top.get("args") {
        Some(Value::Dict(items)) => items
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.clone())))
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn arg_usize(args: &BTreeMap<String, Value>, name: &str) -> Option<usize> {
    args.get(name)?.as_f64().map(|v| v as usize)
}

fn arg_bool(args: &BTreeMap<String, Value>, name: &str) -> Option<bool> {
    match args.get(name)? {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

/// Number of `prefix{i}.` blocks that hold `leaf` (`i` = 0, 1, ...).
fn count_blocks(names: &BTreeSet<&str>, prefix: &str, leaf: &str) -> usize {
    (0..)
        .take_while(|i| names.contains(format!("{prefix}{i}.{leaf}").as_str()))
        .count()
}

/// How one of our parameters is made from checkpoint tensors (named by their keys).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// The tensor as stored.
    Copy(String),
    /// Rows `start..start + len` (one of q, k, v of a packed `in_proj_weight`).
    Rows(String, usize, usize),
    /// The transpose of a matrix (OpenAI CLIP's `x @ proj` as a linear layer's weight).
    Transpose(String),
    /// The tensor in the source's shape (a 1x1 convolution's `[out, in, 1, 1]` as a
    /// linear layer's `[out, in]`).
    Reshape(String),
    /// `base + scale · b @ a`: a LoRA pair (`a: [r, in]`, `b: [out, r]`) merged.
    Merge {
        base: String,
        a: String,
        b: String,
        scale: f32,
    },
}

impl Op {
    /// The checkpoint keys it reads.
    fn keys(&self) -> Vec<&str> {
        match self {
            Op::Copy(k) | Op::Rows(k, _, _) | Op::Transpose(k) | Op::Reshape(k) => {
                vec![k.as_str()]
            }
            Op::Merge { base, a, b, .. } => vec![base.as_str(), a.as_str(), b.as_str()],
        }
    }
}

/// One parameter's source and the shape it will have.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub op: Op,
    pub shape: Vec<usize>,
}

impl Source {
    pub fn copy(key: &str, shape: &[usize]) -> Self {
        Self {
            op: Op::Copy(key.to_string()),
            shape: shape.to_vec(),
        }
    }
}

/// Records what a model asks for: `(name, shape)` of every parameter, answering with
/// broadcast zeros (no allocation) and `contains` from the names a checkpoint will give.
/// `asked` is shared with the caller, who keeps a handle while the builder owns the backend.
struct Recorder {
    asked: std::sync::Arc<std::sync::Mutex<Shapes>>,
    present: BTreeSet<String>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.asked
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.present.contains(name)
    }
}

/// The parameters `cfg` asks for, when its weights will hold `present` names.
fn expected_params(cfg: &GrounderConfig, present: BTreeSet<String>) -> Result<Shapes> {
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = Recorder {
        asked: asked.clone(),
        present,
    };
    Grounder::new(
        VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu),
        cfg,
    )?;
    let asked = asked
        .lock()
        .map_err(|_| TrainError::Config("poisoned".into()))?
        .clone();
    Ok(asked)
}

/// `(our parameter, its source)` for every parameter of the model, and the unused
/// checkpoint keys.
pub type Plan = (Vec<(String, Source)>, Vec<String>);

/// Checks `sources` (our parameter name -> how the checkpoint makes it) against what the
/// model `cfg` asks for. `unmapped`: checkpoint keys no source reads. Missing parameters
/// and shape mismatches are one error naming them all; sources the model does not ask for
/// add their keys to the unused ones.
pub fn plan(
    sources: BTreeMap<String, Source>,
    unmapped: Vec<String>,
    cfg: &GrounderConfig,
    path: &Path,
) -> Result<Plan> {
    let expected = expected_params(cfg, sources.keys().cloned().collect())?;
    let (mut missing, mut wrong, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    let mut wanted = BTreeSet::new();
    for (param, shape) in &expected {
        wanted.insert(param.clone());
        match sources.get(param) {
            None => missing.push(param.clone()),
            Some(s) if &s.shape != shape => wrong.push(format!(
                "{}: the checkpoint gives {:?}, the model needs {shape:?}",
                s.op.keys().join(" + "),
                s.shape
            )),
            Some(s) => pairs.push((param.clone(), s.clone())),
        }
    }
    let used: BTreeSet<&str> = pairs.iter().flat_map(|(_, s)| s.op.keys()).collect();
    let mut unused: BTreeSet<String> = unmapped.into_iter().collect();
    for (param, s) in &sources {
        if !wanted.contains(param) {
            unused.extend(
                s.op.keys()
                    .into_iter()
                    .filter(|k| !used.contains(k))
                    .map(str::to_string),
            );
        }
    }
    if !missing.is_empty() || !wrong.is_empty() {
        let mut msg = String::from("the checkpoint does not fit the model its shapes describe:");
        if !missing.is_empty() {
            let keys: Vec<String> = missing.iter().map(|p| format!("{p} (ours)")).collect();
            msg += &format!("\n{} missing: {}", keys.len(), keys.join(", "));
        }
        if !wrong.is_empty() {
            msg += &format!("\n{} of the wrong shape: {}", wrong.len(), wrong.join("; "));
        }
        return Err(format_err(path, msg));
    }
    Ok((pairs, unused.into_iter().collect()))
}

/// An opened checkpoint's `model` state dict.
struct Checkpoint {
    file: TorchFile,
    entries: Vec<(String, TensorRef)>,
    /// key -> its index in `entries`
    index: HashMap<String, usize>,
    args: BTreeMap<String, Value>,
}

impl Checkpoint {
    /// `what`: the system's name for error messages.
    fn open(path: &Path, what: &str) -> Result<Self> {
        Self::open_entry(path, "model", what)
    }

    /// The state dict under `entry` (`model` for the grounders' training scripts,
    /// `state_dict` for mmcv's).
    fn open_entry(path: &Path, entry: &str, what: &str) -> Result<Self> {
        let file = TorchFile::open(path)?;
        let top = file.object();
        let model = top.get(entry).ok_or_else(|| {
            format_err(path, format!("no `{entry}` entry: not a {what} checkpoint"))
        })?;
        let entries =
            pth::state_dict(model).map_err(|e| format_err(path, format!("model: {e}")))?;
        let args = args_of(top);
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        Ok(Self {
            file,
            entries,
            index,
            args,
        })
    }

    /// The tensor stored under `key`.
    fn tensor(&self, key: &str) -> Option<&TensorRef> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    fn shapes(&self) -> Shapes {
        self.entries
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect()
    }

    /// Makes every planned parameter, one checkpoint tensor at a time.
    fn materialise(&self, pairs: &[(String, Source)]) -> Result<HashMap<String, Tensor>> {
        let read = |key: &str| -> Result<Tensor> {
            let t = self
                .tensor(key)
                .expect("planned sources name checkpoint keys");
            Ok(Tensor::from_vec(
                self.file.read_f32(t)?,
                t.shape.as_slice(),
                &Device::Cpu,
            )?)
        };
        let mut out = HashMap::with_capacity(pairs.len());
        for (param, s) in pairs {
            let t = match &s.op {
                Op::Copy(k) => read(k)?,
                Op::Rows(k, start, len) => read(k)?.narrow(0, *start, *len)?.contiguous()?,
                Op::Transpose(k) => read(k)?.t()?.contiguous()?,
                Op::Reshape(k) => read(k)?.reshape(s.shape.as_slice())?,
                Op::Merge { base, a, b, scale } => {
                    let delta = read(b)?.matmul(&read(a)?)?;
                    (read(base)? + (delta * f64::from(*scale))?)?
                }
            };
            out.insert(param.clone(), t);
        }
        Ok(out)
    }

    /// The report of an import that wrote `pairs`.
    fn report(
        &self,
        path: &Path,
        tensors: &HashMap<String, Tensor>,
        unused: Vec<String>,
        config: GrounderConfig,
    ) -> ImportReport {
        let top = self.file.object();
        ImportReport {
            source: path.to_path_buf(),
            container: format!("{:?}", self.file.container()),
            tensors: tensors.len(),
            values: tensors.values().map(Tensor::elem_count).sum(),
            unused,
            lora_merged: 0,
            lora_kept: 0,
            lora_scale: None,
            args: Value::Dict(
                self.args
                    .iter()
                    .map(|(k, v)| (Value::Str(k.clone()), v.clone()))
                    .collect(),
            )
            .to_json(),
            epoch: top.get("epoch").and_then(Value::as_f64).map(|e| e as i64),
            val_accu: top.get("val_accu").and_then(Value::as_f64),
            config,
        }
    }

    /// The dataset the model was trained on (`args.dataset`, TransVG's names).
    fn dataset(&self) -> String {
        self.args
            .get("dataset")
            .and_then(Value::as_str)
            .unwrap_or("unc")
            .to_string()
    }
}

/// The recipe shape the released systems share (TransVG's `train.py` and its
/// descendants): AdamW with weight decay 1e-4, `groups` by prefix, a step decay x0.1 at
/// epoch `drop_epoch` of `epochs`, no warm-up or clipping, TransVG's augmentation at
/// `image_size` with Pillow's resize.
fn released_recipe(
    batch_size: usize,
    epochs: usize,
    drop_epoch: usize,
    groups: &[(&str, f64)],
    image_size: u32,
) -> OptimConfig {
    OptimConfig {
        batch_size,
        epochs,
        lr: 1e-4,
        groups: groups
            .iter()
            .map(|(prefix, lr_scale)| crate::optim::ParamGroup {
                prefix: prefix.to_string(),
                lr_scale: *lr_scale,
            })
            .collect(),
        weight_decay: 1e-4,
        warmup_steps: 0,
        schedule: crate::optim::Schedule::Step {
            drop_at: drop_epoch as f64 / epochs as f64,
            gamma: 0.1,
        },
        clip_grad: 0.0,
        eval_every: 0,
        workers: 4,
        augment: gk_data::transforms::TransformConfig {
            resize: gk_data::image_io::Resize::PilBilinear,
            jitter: 0.4,
            ..gk_data::transforms::TransformConfig::train(image_size)
        },
        group_images: false,
    }
}

/// The data section of an imported run: the splits of `dataset` as `groundkit convert`
/// names them, under `<dataset>/`.
fn dataset_splits(dataset: &str, run: &RunDir) -> DataConfig {
    let split = |s: &str| PathBuf::from(format!("{dataset}/{dataset}_{s}.jsonl"));
    DataConfig {
        train: split("train"),
        val: split("val"),
        test: match dataset {
            "unc" | "unc+" => vec![split("testA"), split("testB")],
            "gref" | "mixup" => vec![],
            _ => vec![split("test")],
        },
        image_root: None,
        tokenizer: run.file("tokenizer.json").display().to_string(),
        skip_bad: false,
        train_fraction: 1.0,
    }
}

/// Writes the run folder: tokenizer, config (the box losses L1 + GIoU, the recipe
/// `optim`), weights and `import.json`.
fn write_run(
    out: &Path,
    ckpt: &Checkpoint,
    tok: &TextTokenizer,
    tensors: &HashMap<String, Tensor>,
    optim: OptimConfig,
    report: &ImportReport,
) -> Result<()> {
    let run = RunDir::create(out)?;
    let run_cfg = RunConfig {
        seed: 13,
        data: dataset_splits(&ckpt.dataset(), &run),
        optim,
        model: report.config.clone(),
        loss: crate::losses::BoxLossConfig {
            l1: 1.0,
            giou: 1.0,
            ..Default::default()
        },
        pretrained: Vec::new(),
        sincos_positions: false,
        distill: None,
        hilora: None,
    };
    crate::train::save_tokenizer(&run, tok)?;
    run.save_config(&run_cfg)?;
    crate::weights::save_tensors_atomic(tensors, &run.file("best.safetensors"))?;
    run.save_json("import.json", report)?;
    Ok(())
}
