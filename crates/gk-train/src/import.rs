//! Importers of released checkpoints: a published model's torch file in, an ordinary run
//! folder out (`config.toml` with the model kind's preprocessing and recipe,
//! `tokenizer.json`, `best.safetensors`, `import.json`), which `eval`, `predict`, `serve`
//! and fine-tuning (`train --init-from`) take like any trained run.
//!
//! TransVG (`djiajunustc/TransVG`, `TransVG_{unc,unc+,gref,gref_umd,referit}.pth`): the
//! config comes from the tensor shapes (backbone depth and width, encoder sizes, BERT's,
//! `max_query_len` from `vl_pos_embed`), then from the checkpoint's `args` for what shapes
//! cannot tell (head counts, `imsize`, `dilation`); every key is mapped by name, unused
//! ones are listed, missing or wrong-shaped ones are errors naming them. The file is read
//! by the code-free torch reader ([`gk_data::pth`]), tensor by tensor; only the
//! `model` entry is read (never `optimizer` or `lr_scheduler`).

use crate::error::{Result, TrainError};
use crate::optim::{ParamGroup, Schedule};
use crate::run::RunDir;
use crate::train::{DataConfig, OptimConfig, RunConfig};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use gk_data::image_io::Resize;
use gk_data::pickle::Value;
use gk_data::pth::{self, TensorRef, TorchFile};
use gk_data::transforms::TransformConfig;
use gk_models::bert::BertConfig;
use gk_models::detr::DetrConfig;
use gk_models::encoder::EncoderConfig;
use gk_models::grounder::{BoxHead, Grounder, GrounderConfig, TextConfig, VisualConfig};
use gk_models::resnet::ResNetConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// `(name, shape)` of every tensor of a state dict, in file order.
pub type Shapes = Vec<(String, Vec<usize>)>;

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub source: PathBuf,
    pub container: String,
    /// Tensors read into the model and the number of values they hold.
    pub tensors: usize,
    pub values: usize,
    /// Checkpoint keys the model does not use (TransVG: BERT's pooler is used by nothing,
    /// but our BERT keeps it, so this is normally empty).
    pub unused: Vec<String>,
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

/// Whether a state dict is a DETR detector (what TransVG's docs download for training
/// initialisation, `detr-r50-*.pth`), not a TransVG grounder.
fn is_detr_detector(names: &BTreeSet<&str>) -> bool {
    !names.iter().any(|n| n.starts_with("visumodel."))
        && (names.contains("query_embed.weight") || names.contains("class_embed.weight"))
        && names.iter().any(|n| n.starts_with("transformer."))
}

/// Number of `prefix{i}.` blocks that hold `leaf` (`i` = 0, 1, ...).
fn count_blocks(names: &BTreeSet<&str>, prefix: &str, leaf: &str) -> usize {
    (0..)
        .take_while(|i| names.contains(format!("{prefix}{i}.{leaf}").as_str()))
        .count()
}

/// TransVG's config from the shapes of its state dict and its `args`.
pub fn transvg_config(
    shapes: &Shapes,
    args: &BTreeMap<String, Value>,
    path: &Path,
) -> Result<GrounderConfig> {
    let names: BTreeSet<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    let shape = |n: &str| -> Result<&[usize]> {
        shapes
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, s)| s.as_slice())
            .ok_or_else(|| {
                format_err(
                    path,
                    format!("not a TransVG checkpoint: no `{n}` in its model state dict"),
                )
            })
    };
    if is_detr_detector(&names) {
        return Err(format_err(
            path,
            "this is a DETR detection checkpoint (keys transformer.*, backbone.0.body.*, query_embed, \
             class_embed), the kind TransVG's GETTING_STARTED downloads to initialise training \
             (detr-r50-*.pth), not a TransVG grounder. Import a released TransVG model \
             (TransVG_<dataset>.pth), or train from the DETR weights with a [pretrained] entry",
        ));
    }
    let body = "visumodel.backbone.0.body.";
    let width = shape(&format!("{body}conv1.weight"))?[0];
    let mut layers = [0usize; 4];
    for (i, n) in layers.iter_mut().enumerate() {
        *n = count_blocks(&names, &format!("{body}layer{}.", i + 1), "conv1.weight");
        if *n == 0 {
            return Err(format_err(
                path,
                format!("no {body}layer{}.0.* keys", i + 1),
            ));
        }
    }
    let backbone = ResNetConfig {
        layers,
        width,
        dilation: matches!(args.get("dilation"), Some(Value::Bool(true))),
    };
    let proj = shape("visumodel.input_proj.weight")?;
    let d = proj[0];
    if proj.get(1) != Some(&backbone.out_channels()) {
        return Err(format_err(
            path,
            format!(
                "visumodel.input_proj.weight is {proj:?}: it should read the backbone's {} channels",
                backbone.out_channels()
            ),
        ));
    }
    let heads = |arg: &str, d: usize| -> Result<usize> {
        let h = arg_usize(args, arg).unwrap_or(8);
        if h == 0 || !d.is_multiple_of(h) {
            return Err(format_err(
                path,
                format!("{arg} = {h} does not divide the width {d}"),
            ));
        }
        Ok(h)
    };
    // a post-norm DETR-style encoder under `prefix` of width `hidden`, heads from `args`
    let encoder_at = |prefix: &str, heads_arg: &str, hidden: usize| -> Result<EncoderConfig> {
        Ok(EncoderConfig {
            hidden,
            layers: count_blocks(&names, prefix, "linear1.weight"),
            heads: heads(heads_arg, hidden)?,
            ffn: shape(&format!("{prefix}0.linear1.weight"))?[0],
            dropout: 0.1,
            pre_norm: false,
        })
    };
    let encoder = encoder_at("visumodel.transformer.encoder.layers.", "nheads", d)?;
    let bert = "textmodel.bert.";
    let words = shape(&format!("{bert}embeddings.word_embeddings.weight"))?;
    let hidden = words[1];
    if hidden % 64 != 0 {
        return Err(format_err(
            path,
            format!("BERT width {hidden} is not a multiple of BERT's head size 64"),
        ));
    }
    let text = BertConfig {
        vocab_size: words[0],
        hidden_size: hidden,
        num_hidden_layers: count_blocks(
            &names,
            &format!("{bert}encoder.layer."),
            "attention.self.query.weight",
        ),
        num_attention_heads: hidden / 64,
        intermediate_size: shape(&format!("{bert}encoder.layer.0.intermediate.dense.weight"))?[0],
        max_position_embeddings: shape(&format!("{bert}embeddings.position_embeddings.weight"))?[0],
        type_vocab_size: shape(&format!("{bert}embeddings.token_type_embeddings.weight"))?[0],
        ..BertConfig::base()
    };
    let pos = shape("vl_pos_embed.weight")?;
    let fusion = encoder_at("vl_transformer.encoder.layers.", "vl_nheads", pos[1])?;
    let image_size = arg_usize(args, "imsize").unwrap_or(640);
    let visual = DetrConfig { backbone, encoder };
    if !image_size.is_multiple_of(visual.backbone.stride()) {
        return Err(format_err(
            path,
            format!(
                "imsize {image_size} is not a multiple of {}",
                visual.backbone.stride()
            ),
        ));
    }
    let cells = visual.grid(image_size).pow(2);
    let max_text_len = pos[0].checked_sub(1 + cells).filter(|&l| l >= 3).ok_or_else(|| {
        format_err(
            path,
            format!("vl_pos_embed has {} rows: fewer than 1 + 3 text + {cells} visual tokens at {image_size} px", pos[0]),
        )
    })?;
    if let Some(q) = arg_usize(args, "max_query_len") {
        if q != max_text_len {
            return Err(format_err(
                path,
                format!("args.max_query_len is {q} but vl_pos_embed's {} rows give {max_text_len} at imsize {image_size}", pos[0]),
            ));
        }
    }
    if max_text_len > text.max_position_embeddings {
        return Err(format_err(
            path,
            format!(
                "max_query_len {max_text_len} exceeds BERT's {} positions",
                text.max_position_embeddings
            ),
        ));
    }
    Ok(GrounderConfig {
        visual: VisualConfig::Detr(visual),
        text: TextConfig::Bert(text),
        fusion,
        image_size,
        max_text_len,
        head: BoxHead::RegMlp,
        word_head: false,
    })
}

/// Our parameter name of a TransVG key (`None`: not part of the model).
pub fn transvg_key(name: &str) -> Option<String> {
    const MAP: &[(&str, &str)] = &[
        ("visumodel.backbone.0.body.", "visual.backbone."),
        ("visumodel.input_proj.", "visual.input_proj."),
        (
            "visumodel.transformer.encoder.layers.",
            "visual.encoder.layers.",
        ),
        ("textmodel.bert.", "text."),
        ("vl_transformer.encoder.layers.", "vl_transformer.layers."),
        ("vl_pos_embed.", "vl_pos_embed."),
        ("reg_token.", "reg_token."),
        ("visu_proj.", "visu_proj."),
        ("text_proj.", "text_proj."),
        ("bbox_embed.", "bbox_embed."),
    ];
    MAP.iter()
        .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
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

/// `(checkpoint key, our parameter)` pairs, and the unused checkpoint keys.
pub type Plan = (Vec<(String, String)>, Vec<String>);

/// Maps a state dict's keys onto the model `cfg`: the `(checkpoint key, parameter)` pairs,
/// and the unused keys. Missing parameters and shape mismatches are one error naming them
/// all.
pub fn plan(
    shapes: &Shapes,
    cfg: &GrounderConfig,
    rename: impl Fn(&str) -> Option<String>,
    path: &Path,
) -> Result<Plan> {
    let mut by_param: HashMap<String, (String, Vec<usize>)> = HashMap::new();
    let mut unused = Vec::new();
    for (name, shape) in shapes {
        match rename(name) {
            Some(p) => {
                by_param.insert(p, (name.clone(), shape.clone()));
            }
            None => unused.push(name.clone()),
        }
    }
    let expected = expected_params(cfg, by_param.keys().cloned().collect())?;
    let (mut missing, mut wrong, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    let mut wanted = BTreeSet::new();
    for (param, shape) in &expected {
        wanted.insert(param.clone());
        match by_param.get(param) {
            None => missing.push(param.clone()),
            Some((key, s)) if s != shape => wrong.push(format!(
                "{key}: the checkpoint has {s:?}, the model needs {shape:?}"
            )),
            Some((key, _)) => pairs.push((key.clone(), param.clone())),
        }
    }
    for (param, (key, _)) in &by_param {
        if !wanted.contains(param) {
            unused.push(key.clone());
        }
    }
    unused.sort();
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
    Ok((pairs, unused))
}

/// TransVG's training recipe (`train.py`, methods.md §1.3) as our optimiser settings, for
/// fine-tuning an imported run: AdamW at 1e-4 for the fusion, projections and head, 1e-5
/// for the ResNet, the DETR encoder and BERT; weight decay 1e-4; StepLR x0.1 at epoch 60 of
/// 90; no clipping; batch 64; TransVG's augmentation at 640 px with PIL's resize.
pub fn transvg_optim(image_size: u32) -> OptimConfig {
    OptimConfig {
        batch_size: 64,
        epochs: 90,
        lr: 1e-4,
        groups: vec![
            ParamGroup {
                prefix: "visual.".into(),
                lr_scale: 0.1,
            },
            ParamGroup {
                prefix: "text.".into(),
                lr_scale: 0.1,
            },
        ],
        weight_decay: 1e-4,
        warmup_steps: 0,
        schedule: Schedule::Step {
            drop_at: 60.0 / 90.0,
            gamma: 0.1,
        },
        clip_grad: 0.0,
        eval_every: 0,
        workers: 4,
        augment: TransformConfig {
            resize: Resize::PilBilinear,
            jitter: 0.4,
            ..TransformConfig::train(image_size)
        },
        group_images: false,
    }
}

/// `import transvg`: the checkpoint's `model` into the run folder `out`, with the
/// WordPiece vocabulary `vocab` (bert-base-uncased's `vocab.txt`; the checkpoint holds none).
pub fn import_transvg(checkpoint: &Path, vocab: &Path, out: &Path) -> Result<ImportReport> {
    let file = TorchFile::open(checkpoint)?;
    let top = file.object();
    let model = top.get("model").ok_or_else(|| {
        format_err(checkpoint, "no `model` entry: not a TransVG training checkpoint ({'model', 'optimizer', 'args', ...})")
    })?;
    let entries: Vec<(String, TensorRef)> =
        pth::state_dict(model).map_err(|e| format_err(checkpoint, format!("model: {e}")))?;
    let shapes: Shapes = entries
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone()))
        .collect();
    let args = args_of(top);
    let cfg = transvg_config(&shapes, &args, checkpoint)?;
    let (pairs, unused) = plan(&shapes, &cfg, transvg_key, checkpoint)?;
    let tok = gk_data::tokenize::bert_wordpiece(vocab, true)?;
    if tok.vocab_size() != cfg.text_vocab() {
        return Err(format_err(
            vocab,
            format!(
                "has {} tokens but the checkpoint's word embeddings have {} rows: use the vocabulary the model was trained with (bert-base-uncased: 30522)",
                tok.vocab_size(),
                cfg.text_vocab()
            ),
        ));
    }
    // one tensor at a time from the file: the model's values are held once
    let refs: HashMap<&str, &TensorRef> = entries.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(pairs.len());
    let mut values = 0;
    for (key, param) in &pairs {
        let t = refs[key.as_str()];
        let data = file.read_f32(t)?;
        values += data.len();
        tensors.insert(
            param.clone(),
            Tensor::from_vec(data, t.shape.as_slice(), &Device::Cpu)?,
        );
    }
    let run = RunDir::create(out)?;
    let dataset = args
        .get("dataset")
        .and_then(Value::as_str)
        .unwrap_or("unc")
        .to_string();
    let split = |s: &str| PathBuf::from(format!("{dataset}/{dataset}_{s}.jsonl"));
    let run_cfg = RunConfig {
        seed: 13,
        data: DataConfig {
            train: split("train"),
            val: split("val"),
            test: match dataset.as_str() {
                "unc" | "unc+" => vec![split("testA"), split("testB")],
                "gref" => vec![],
                _ => vec![split("test")],
            },
            image_root: None,
            tokenizer: run.file("tokenizer.json").display().to_string(),
            skip_bad: false,
            train_fraction: 1.0,
        },
        optim: transvg_optim(cfg.image_size as u32),
        model: cfg.clone(),
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
    crate::train::save_tokenizer(&run, &tok)?;
    run.save_config(&run_cfg)?;
    crate::weights::save_tensors_atomic(&tensors, &run.file("best.safetensors"))?;
    let report = ImportReport {
        source: checkpoint.to_path_buf(),
        container: format!("{:?}", file.container()),
        tensors: pairs.len(),
        values,
        unused,
        args: Value::Dict(args.into_iter().map(|(k, v)| (Value::Str(k), v)).collect()).to_json(),
        epoch: top.get("epoch").and_then(Value::as_f64).map(|e| e as i64),
        val_accu: top.get("val_accu").and_then(Value::as_f64),
        config: cfg,
    };
    run.save_json("import.json", &report)?;
    Ok(report)
}
