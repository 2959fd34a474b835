//! TransVG (`djiajunustc/TransVG`, `TransVG_{unc,unc+,gref,gref_umd,referit}.pth`): the
//! config comes from the tensor shapes (backbone depth and width, encoder sizes, BERT's,
//! `max_query_len` from `vl_pos_embed`), then from the checkpoint's `args` for what shapes
//! cannot tell (head counts, `imsize`, `dilation`); every key maps by name.

use super::{
    arg_usize, count_blocks, format_err, plan, released_recipe, write_run, Checkpoint,
    ImportReport, Shapes, Source,
};
use crate::error::Result;
use crate::train::OptimConfig;
use gk_data::pickle::Value;
use gk_models::bert::BertConfig;
use gk_models::detr::DetrConfig;
use gk_models::encoder::EncoderConfig;
use gk_models::grounder::{BoxHead, FusionLayout, GrounderConfig, TextConfig, VisualConfig};
use gk_models::resnet::ResNetConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Whether a state dict is a DETR detector (what TransVG's docs download for training
/// initialisation, `detr-r50-*.pth`), not a TransVG grounder.
fn is_detr_detector(names: &BTreeSet<&str>) -> bool {
    !names.iter().any(|n| n.starts_with("visumodel."))
        && (names.contains("query_embed.weight") || names.contains("class_embed.weight"))
        && names.iter().any(|n| n.starts_with("transformer."))
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
        layout: FusionLayout::default(),
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

/// TransVG's training recipe (`train.py`, methods.md §1.3) as our optimiser settings, for
/// fine-tuning an imported run: AdamW at 1e-4 for the fusion, projections and head, 1e-5
/// for the ResNet, the DETR encoder and BERT; weight decay 1e-4; StepLR x0.1 at epoch 60 of
/// 90; no clipping; batch 64; TransVG's augmentation at 640 px with PIL's resize.
pub fn transvg_optim(image_size: u32) -> OptimConfig {
    released_recipe(64, 90, 60, &[("visual.", 0.1), ("text.", 0.1)], image_size)
}

/// `import transvg`: the checkpoint's `model` into the run folder `out`, with the
/// WordPiece vocabulary `vocab` (bert-base-uncased's `vocab.txt`; the checkpoint holds none).
pub fn import_transvg(checkpoint: &Path, vocab: &Path, out: &Path) -> Result<ImportReport> {
    let ckpt = Checkpoint::open(checkpoint, "TransVG")?;
    let cfg = transvg_config(&ckpt.shapes(), &ckpt.args, checkpoint)?;
    let (mut sources, mut unmapped) = (BTreeMap::new(), Vec::new());
    for (name, t) in &ckpt.entries {
        match transvg_key(name) {
            Some(p) => {
                sources.insert(p, Source::copy(name, &t.shape));
            }
            None => unmapped.push(name.clone()),
        }
    }
    let (pairs, unused) = plan(sources, unmapped, &cfg, checkpoint)?;
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
    let tensors = ckpt.materialise(&pairs)?;
    let report = ckpt.report(checkpoint, &tensors, unused, cfg);
    let optim = transvg_optim(report.config.image_size as u32);
    write_run(out, &ckpt, &tok, &tensors, optim, &report)?;
    Ok(report)
}
