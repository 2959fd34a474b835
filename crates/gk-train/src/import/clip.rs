//! The CLIP-based releases: HiVG (`linhuixiao/HiVG`, `best_checkpoint.pth` per dataset and
//! the mixup-pretrained one) and CLIP-VG (`linhuixiao/CLIP-VG`), as `shared/checkpoints.md`
//! Part A §4 and Part B §2 lay them out.
//!
//! - **HiVG**: Hugging Face `CLIPModel` names under `clip.` + `base_model.model.` once per
//!   `get_peft_model` call (peft 0.3 nests one prefix per call: four for `--hi_lora_stage
//!   3`), or newer peft's `*.base_layer.*` for wrapped layers; unmerged LoRA pairs
//!   (`lora_A.<adapter>.weight [r, in]`, `lora_B [out, r]`) merged as `W + scale · B·A`
//!   (HiVG's `set_HiLoRA`: r 32, alpha 16, scale 0.5). The bridges' `cross_attn` base
//!   weights were trained and have no CLIP counterpart: a file without them is refused
//!   (newer peft's renaming made HiVG's own `strict=False` load drop them silently). The
//!   number of mixed text layers comes from `cross_gate`'s width (and must agree with
//!   `args.dataset`), Base or Large from the depth.
//! - **CLIP-VG**: OpenAI CLIP names (`clip.visual.transformer.resblocks.*` with packed
//!   `in_proj_weight`, `c_fc`/`c_proj`, `x @ proj` matrices) in half precision, plus the
//!   same tensors again under `image_encoder_clip_vg.*`/`text_encoder_clip_vg.*` (one
//!   storage, two keys: recognised as aliases, not listed as unused).
//!
//! Both models become our HiVG visual encoder (CLIP-VG's without bridges) with the
//! published systems' [`FusionLayout`]: `clip.tokenize`'s zero padding, id 0 masked in
//! the fusion, the text tower on all 77 positions, CLIP's `text_projection` before
//! `text_proj`; HiVG's order `[REG, visual, text]` with a pre-norm fusion and its
//! antialiased patch mask, CLIP-VG's `[REG, text, visual]` post-norm with the plain
//! bilinear one and no `visu_proj`. Preprocessing: TransVG's at 224 (Pillow's bilinear
//! long-side resize, ImageNet mean and std, centred padding).

use super::{
    arg_bool, arg_usize, count_blocks, format_err, plan, released_recipe, write_run, Checkpoint,
    ImportReport, Op, Source,
};
use crate::error::Result;
use crate::train::OptimConfig;
use gk_data::tokenize::TextTokenizer;
use gk_models::clip::{ClipTextConfig, ClipVisionConfig};
use gk_models::encoder::EncoderConfig;
use gk_models::grounder::{BoxHead, FusionLayout, GrounderConfig, TextConfig, VisualConfig};
use gk_models::hivg::{BridgeMode, BridgeText, HivgConfig, PatchMask};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What `import hivg` / `import clip-vg` cannot read from the file.
#[derive(Debug, Clone, PartialEq)]
pub struct HivgImport {
    /// CLIP's head counts `(vision, text)`; `None`: CLIP's 64-wide heads (ViT-B: 12 and 8).
    pub heads: Option<(usize, usize)>,
    /// HiVG's LoRA scale `alpha / r` (its `set_HiLoRA`: 16 / 32).
    pub lora_scale: f32,
    /// How the bridges read the text: `PerSample` (exact at batch 1, independent of the
    /// batch) or `Batched` (HiVG's code, as its numbers were made).
    pub bridge_mode: BridgeMode,
    /// Keep HiVG's LoRA pairs as a LoRA set (`lora_A.default`, `lora_B.default` on the
    /// towers' and bridges' attention projections) instead of merging them: for further
    /// HiLoRA training. Prediction merges them at load either way.
    pub keep_lora: bool,
}

impl Default for HivgImport {
    fn default() -> Self {
        Self {
            heads: None,
            lora_scale: 0.5,
            bridge_mode: BridgeMode::PerSample,
            keep_lora: false,
        }
    }
}

/// The shape of a key, or an error naming it.
fn shape_of<'a>(
    shapes: &'a BTreeMap<String, Vec<usize>>,
    path: &Path,
    what: &str,
) -> impl Fn(&str) -> Result<&'a [usize]> + 'a {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |n: &str| {
        shapes.get(n).map(Vec::as_slice).ok_or_else(|| {
            format_err(
                &path,
                format!("not a {what} checkpoint: no `{n}` in its model state dict"),
            )
        })
    }
}

/// CLIP's 64-wide heads of a width, or the given count.
fn heads(width: usize, given: Option<usize>, path: &Path, tower: &str) -> Result<usize> {
    let h = given.unwrap_or(width / 64);
    if h == 0 || !width.is_multiple_of(h) {
        return Err(format_err(
            path,
            format!("the {tower} tower's width {width} is not a multiple of CLIP's 64-wide heads: give the head counts (--heads VISION,TEXT)"),
        ));
    }
    Ok(h)
}

/// A ViT-B/16-style vision tower of `width`, `ffn`, `layers`, whose `n_pos` positions
/// (CLS + a square grid) at `patch` px per patch give the image size; heads from `opts`.
fn vision_config(
    width: usize,
    ffn: usize,
    layers: usize,
    (n_pos, patch): (usize, usize),
    opts: &HivgImport,
    path: &Path,
) -> Result<ClipVisionConfig> {
    let grid = (n_pos.saturating_sub(1) as f64).sqrt() as usize;
    if grid * grid + 1 != n_pos {
        return Err(format_err(
            path,
            format!("{n_pos} vision positions are not a square grid plus CLS"),
        ));
    }
    Ok(ClipVisionConfig {
        hidden_size: width,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads(width, opts.heads.map(|h| h.0), path, "vision")?,
        image_size: grid * patch,
        patch_size: patch,
        ..ClipVisionConfig::vit_base_patch16()
    })
}

/// The tokenizer of a CLIP release: a `tokenizer.json`, or a CLIP folder holding one; its
/// ids must fit the token embedding's `rows`.
fn clip_tokenizer(path: &Path, rows: usize) -> Result<TextTokenizer> {
    let file = match path.is_dir() {
        true => path.join("tokenizer.json"),
        false => path.to_path_buf(),
    };
    let tok = TextTokenizer::from_file(&file)?; // padding: the run's layout (pad_id 0)
    for special in ["<|startoftext|>", "<|endoftext|>"] {
        if tok.inner().token_to_id(special).is_none() {
            return Err(format_err(
                &file,
                format!("has no {special}: not a CLIP tokenizer"),
            ));
        }
    }
    if tok.vocab_size() > rows {
        return Err(format_err(
            &file,
            format!(
                "has {} tokens but the checkpoint's token embedding has {rows} rows: use CLIP's tokenizer (49408 tokens)",
                tok.vocab_size()
            ),
        ));
    }
    Ok(tok)
}

/// The text tower's config from its width, depth and vocabulary; specials from `tok`.
fn text_config(
    vocab: usize,
    width: usize,
    ffn: usize,
    layers: usize,
    positions: usize,
    heads: usize,
    tok: &TextTokenizer,
) -> ClipTextConfig {
    let id = |t: &str| tok.inner().token_to_id(t).unwrap_or(0);
    ClipTextConfig {
        vocab_size: vocab,
        hidden_size: width,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        max_position_embeddings: positions,
        pad_token_id: 0,
        bos_token_id: id("<|startoftext|>"),
        eos_token_id: id("<|endoftext|>"),
        ..ClipTextConfig::base()
    }
}

/// HiVG's recipe for fine-tuning an import (its `hivg_train.py` defaults as the eval
/// scripts pass them): AdamW 1e-4, CLIP frozen but the bridges, weight decay 1e-4, batch
/// 32, 224 px with TransVG's augmentation and Pillow's resize.
fn clip_optim(image_size: u32) -> OptimConfig {
    let groups = [
        ("visual.bridge.", 1.0),
        ("visual.ml_visual_projection.", 1.0),
        ("visual.condition_text_proj.", 1.0),
        ("visual.", 0.0),
        ("text.", 0.0),
        ("visual_projection.", 0.0),
        ("text_projection.", 0.0),
        ("logit_scale", 0.0),
    ];
    released_recipe(32, 30, 20, &groups, image_size)
}

/// HiVG's key without its peft wrapping: `clip.` + `base_model.model.`* stripped to
/// `clip.`, `.base_layer.` dropped.
fn unwrap_peft(key: &str) -> String {
    let Some(mut rest) = key.strip_prefix("clip.") else {
        return key.to_string();
    };
    while let Some(r) = rest.strip_prefix("base_model.model.") {
        rest = r;
    }
    format!("clip.{}", rest.replace(".base_layer.", "."))
}

/// `(module, adapter)` of a LoRA `A` key (`<module>.lora_A.<adapter>.weight`).
fn lora_a(key: &str) -> Option<(&str, &str)> {
    let (module, rest) = key.split_once(".lora_A.")?;
    Some((module, rest.strip_suffix(".weight")?))
}

/// Our name of a HiVG key (unwrapped by [`unwrap_peft`]; `None`: not part of our model).
/// `bridges`: the vision layers with a bridge, in order.
fn hivg_key(name: &str, bridges: &[usize]) -> Option<String> {
    if let Some(rest) = name.strip_prefix("clip.vision_model.encoder.layers.") {
        let (layer, leaf) = rest.split_once('.')?;
        if let Some(x) = leaf.strip_prefix("cross_") {
            let j = bridges
                .iter()
                .position(|&b| Some(b) == layer.parse().ok())?;
            let to = match x.split_once('.') {
                Some(("gate", w)) => format!("gate.{w}"),
                Some(("adaptive_weights", w)) => {
                    format!("adaptive.{}", w.strip_suffix(".weight")?)
                }
                _ => format!("cross_{x}"),
            };
            return Some(format!("visual.bridge.{j}.{to}"));
        }
    }
    const MAP: &[(&str, &str)] = &[
        ("clip.vision_model.", "visual."),
        ("clip.text_model.", "text."),
        ("clip.visual_projection.", "visual_projection."),
        ("clip.text_projection.", "text_projection."),
        ("clip.logit_scale", "logit_scale"),
        ("ml_visual_projection.", "visual.ml_visual_projection."),
        ("condition_text_proj.", "visual.condition_text_proj."),
        ("vl_transformer.encoder.layers.", "vl_transformer.layers."),
        ("vl_transformer.encoder.norm.", "vl_transformer.norm."),
        ("vl_pos_embed.", "vl_pos_embed."),
        ("reg_token.", "reg_token."),
        ("visu_proj.", "visu_proj."),
        ("text_proj.", "text_proj."),
        ("bbox_embed.", "bbox_embed."),
    ];
    if name.ends_with("position_ids") {
        return None; // buffers
    }
    MAP.iter()
        .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
}

/// HiVG's `extract_text_layer` for `args.dataset` (`HiVG.py` :686-699) in a text tower
/// of `depth` layers.
fn hivg_text_layers(dataset: &str, depth: usize) -> Vec<usize> {
    match dataset {
        "unc+" | "referit" => vec![depth / 2, depth],
        "gref" | "gref_umd" => (1..=depth).collect(),
        _ => vec![depth],
    }
}

/// `import hivg`: a released HiVG checkpoint into the run folder `out`, with CLIP's
/// tokenizer (`tokenizer`: a `tokenizer.json` or a CLIP folder; the file holds none).
pub fn import_hivg(
    checkpoint: &Path,
    tokenizer: &Path,
    out: &Path,
    opts: &HivgImport,
) -> Result<ImportReport> {
    let path = checkpoint;
    let ckpt = Checkpoint::open(path, "HiVG")?;
    // unwrapped names -> (checkpoint key, shape)
    let mut by_name: BTreeMap<String, (String, Vec<usize>)> = BTreeMap::new();
    let mut loras: Vec<(String, String, String)> = Vec::new(); // (module, A key, adapter)
    let mut lora_b = 0;
    for (key, t) in &ckpt.entries {
        let name = unwrap_peft(key);
        if let Some((module, adapter)) = lora_a(&name) {
            loras.push((module.to_string(), key.clone(), adapter.to_string()));
            continue;
        }
        if name.contains(".lora_B.") {
            lora_b += 1; // read with its A
            continue;
        }
        if let Some((first, _)) = by_name.insert(name.clone(), (key.clone(), t.shape.clone())) {
            return Err(format_err(
                path,
                format!("`{first}` and `{key}` are the same parameter ({name}) twice"),
            ));
        }
    }
    if lora_b != loras.len() {
        return Err(format_err(
            path,
            format!(
                "{} lora_A but {lora_b} lora_B weights: an adapter lost half of its pair",
                loras.len()
            ),
        ));
    }
    let shapes: BTreeMap<String, Vec<usize>> = by_name
        .iter()
        .map(|(n, (_, s))| (n.clone(), s.clone()))
        .collect();
    let names: BTreeSet<&str> = shapes.keys().map(String::as_str).collect();
    let shape = shape_of(&shapes, path, "HiVG");
    let v = "clip.vision_model.";
    let patch = shape(&format!("{v}embeddings.patch_embedding.weight"))?;
    let (cv, p) = (patch[0], patch[2]);
    let n_pos = shape(&format!("{v}embeddings.position_embedding.weight"))?[0];
    let vision_layers = count_blocks(&names, &format!("{v}encoder.layers."), "layer_norm1.weight");
    let t = "clip.text_model.";
    let words = shape(&format!("{t}embeddings.token_embedding.weight"))?;
    let ct = words[1];
    let text_len = shape(&format!("{t}embeddings.position_embedding.weight"))?[0];
    let text_layers_n = count_blocks(&names, &format!("{t}encoder.layers."), "layer_norm1.weight");
    let bridges: Vec<usize> = (0..vision_layers)
        .filter(|i| {
            let pre = format!("{v}encoder.layers.{i}.cross_");
            names.iter().any(|n| n.starts_with(&pre))
        })
        .collect();
    if bridges.is_empty() {
        return Err(format_err(
            path,
            "no cross-modal bridge (`cross_*` keys) in any vision layer: not a HiVG model (a plain CLIP, or the debiased-CLIP init file?)",
        ));
    }
    // the trained bridge attention: refuse a file that lost it (newer peft's renaming)
    let mut lost = Vec::new();
    for &l in &bridges {
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            let k = format!("{v}encoder.layers.{l}.cross_attn.{proj}.weight");
            if !names.contains(k.as_str()) {
                lost.push(k);
            }
        }
    }
    if !lost.is_empty() {
        return Err(format_err(
            path,
            format!(
                "the bridges' trained attention weights are missing ({}): they are part of HiVG, not of CLIP, and cannot be replaced; the file was probably re-saved after a load that dropped them (HiVG README: newer peft renames them to *.base_layer.*)",
                lost.join(", ")
            ),
        ));
    }
    let (multi_layers, preset) = match vision_layers {
        12 => (vec![1, 4, 8, 12], vec![0, 3, 7, 11]),
        24 => (vec![6, 12, 18, 24], vec![4, 10, 16, 22]),
        n => {
            return Err(format_err(
                path,
                format!("{n} vision layers: HiVG has Base (12) and Large (24) towers"),
            ))
        }
    };
    if bridges != preset {
        return Err(format_err(
            path,
            format!("bridges in vision layers {bridges:?}, HiVG's {vision_layers}-layer tower has them in {preset:?}"),
        ));
    }
    let gate_in = shape(&format!(
        "{v}encoder.layers.{}.cross_gate.weight",
        bridges[0]
    ))?[1];
    let n_text = gate_in / ct;
    let args = &ckpt.args;
    let dataset = ckpt.dataset();
    let mixup = arg_bool(args, "mixup_pretrain").unwrap_or(false);
    let text_layers = if mixup || n_text == 1 {
        vec![text_layers_n]
    } else if n_text == 2 {
        vec![text_layers_n / 2, text_layers_n]
    } else if n_text == text_layers_n {
        (1..=text_layers_n).collect()
    } else {
        return Err(format_err(
            path,
            format!(
                "cross_gate reads {n_text} text layers: HiVG mixes 1, 2 or all {text_layers_n}"
            ),
        ));
    };
    if !mixup && args.contains_key("dataset") {
        let want = hivg_text_layers(&dataset, text_layers_n);
        if want != text_layers {
            return Err(format_err(
                path,
                format!("args.dataset {dataset:?} means text layers {want:?}, but cross_gate reads {n_text}"),
            ));
        }
    }
    if !mixup && arg_bool(args, "enable_adaptive_weights") == Some(false) {
        return Err(format_err(
            path,
            "trained without --enable_adaptive_weights: its bridges read the raw last text layer, which no released HiVG does (not supported)",
        ));
    }
    let ml = shape("ml_visual_projection.weight")?;
    if ml[1] != cv * multi_layers.len() {
        return Err(format_err(
            path,
            format!(
                "ml_visual_projection reads {} features, not {} levels of {cv}",
                ml[1],
                multi_layers.len()
            ),
        ));
    }
    let contrastive = shape("clip.text_projection.weight")?[0];
    // kept LoRA: one set, the file's rank, alpha = scale * rank
    let lora = match (opts.keep_lora, loras.first()) {
        (true, Some((_, a_key, adapter))) => {
            let rank = |k: &str| ckpt.tensor(k).map(|t| t.shape[0]);
            let r = rank(a_key).unwrap_or(0);
            if let Some((_, k, _)) = loras
                .iter()
                .find(|(_, k, ad)| rank(k) != Some(r) || ad != adapter)
            {
                return Err(format_err(path, format!("{k}: LoRA pairs of different ranks or adapters cannot be kept as one set (import without --keep-lora to merge them)")));
            }
            vec![gk_models::lora::LoraConfig {
                name: adapter.clone(),
                rank: r,
                alpha: f64::from(opts.lora_scale) * r as f64,
                dropout: 0.1,
                targets: ["q_proj", "k_proj", "v_proj", "out_proj"]
                    .map(String::from)
                    .to_vec(),
            }]
        }
        _ => Vec::new(),
    };
    let tok = clip_tokenizer(tokenizer, words[0])?;
    let th = opts.heads.map(|h| h.1);
    let vision = ClipVisionConfig {
        lora: lora.clone(),
        ..vision_config(
            cv,
            shape(&format!("{v}encoder.layers.0.mlp.fc1.weight"))?[0],
            vision_layers,
            (n_pos, p),
            opts,
            path,
        )?
    };
    let text = ClipTextConfig {
        lora,
        ..text_config(
            words[0],
            ct,
            shape(&format!("{t}encoder.layers.0.mlp.fc1.weight"))?[0],
            text_layers_n,
            text_len,
            heads(ct, th, path, "text")?,
            &tok,
        )
    };
    let hivg = HivgConfig {
        vision,
        bridge_layers: bridges.clone(),
        text_layers,
        multi_layers,
        text_dim: ct,
        text_len: shape(&format!(
            "{v}encoder.layers.{}.cross_adaptive_weights.0.weight",
            bridges[0]
        ))?[0],
        proj_dim: ml[0],
        contrastive_dim: contrastive,
        level_norm: false,
        bridge_mode: opts.bridge_mode,
        bridge_text: if mixup {
            BridgeText::Projected
        } else {
            BridgeText::Hidden
        },
        aux_heads: false,
        patch_mask: PatchMask::BilinearAntialias,
        bridge_ffn: shape(&format!(
            "{v}encoder.layers.{}.cross_mlp.fc1.weight",
            bridges[0]
        ))?[0],
    };
    let cfg = fusion_config(
        VisualConfig::Hivg(hivg),
        TextConfig::ClipText(text),
        FusionLayout::clip_release(true),
        &shapes,
        args,
        path,
    )?;
    // our parameters: LoRA-wrapped ones merged, the rest copied
    let mut sources = BTreeMap::new();
    let mut unmapped = Vec::new();
    let mut merged = BTreeSet::new();
    for (module, a_key, adapter) in &loras {
        let base_name = format!("{module}.weight");
        let b_key = a_key.replace(
            &format!(".lora_A.{adapter}."),
            &format!(".lora_B.{adapter}."),
        );
        let Some((base_key, base_shape)) = by_name.get(&base_name) else {
            return Err(format_err(
                path,
                format!("LoRA adapters for {module} but no base weight ({base_name} or its .base_layer. form)"),
            ));
        };
        if ckpt.tensor(&b_key).is_none() {
            return Err(format_err(path, format!("{a_key} has no {b_key}")));
        }
        let Some(param) = hivg_key(&base_name, &bridges) else {
            unmapped.extend([a_key.clone(), b_key]);
            continue;
        };
        if opts.keep_lora {
            let module = param.trim_end_matches(".weight");
            for (ab, key) in [("A", a_key), ("B", &b_key)] {
                let shape = &ckpt.tensor(key).expect("listed").shape;
                sources.insert(
                    format!("{module}.lora_{ab}.{adapter}.weight"),
                    Source::copy(key, shape),
                );
            }
            continue;
        }
        merged.insert(base_name.clone());
        sources.insert(
            param,
            Source {
                op: Op::Merge {
                    base: base_key.clone(),
                    a: a_key.clone(),
                    b: b_key,
                    scale: opts.lora_scale,
                },
                shape: base_shape.clone(),
            },
        );
    }
    for (name, (key, shape)) in &by_name {
        if merged.contains(name) {
            continue;
        }
        match hivg_key(name, &bridges) {
            Some(p) => {
                sources.insert(p, Source::copy(key, shape));
            }
            None => unmapped.push(key.clone()),
        }
    }
    let (pairs, unused) = plan(sources, unmapped, &cfg, path)?;
    let tensors = ckpt.materialise(&pairs)?;
    let mut report = ckpt.report(path, &tensors, unused, cfg);
    report.lora_merged = merged.len();
    report.lora_kept = if opts.keep_lora { loras.len() } else { 0 };
    report.lora_scale = Some(opts.lora_scale);
    let optim = clip_optim(report.config.image_size as u32);
    write_run(out, &ckpt, &tok, &tensors, optim, &report)?;
    Ok(report)
}

/// The grounder around a CLIP-based visual and text config: the fusion read from
/// `vl_transformer.encoder.layers.*` (pre-norm when `vl_transformer.encoder.norm` exists,
/// heads from `args.vl_nheads`, default 8), the image size from the vision positions, the
/// text length from `vl_pos_embed`.
fn fusion_config(
    visual: VisualConfig,
    text: TextConfig,
    layout: FusionLayout,
    shapes: &BTreeMap<String, Vec<usize>>,
    args: &BTreeMap<String, gk_data::pickle::Value>,
    path: &Path,
) -> Result<GrounderConfig> {
    let fusion = "vl_transformer.encoder.";
    let names: BTreeSet<&str> = shapes.keys().map(String::as_str).collect();
    let shape = shape_of(shapes, path, "CLIP-based grounder");
    let pos = shape("vl_pos_embed.weight")?;
    let d = pos[1];
    let h = arg_usize(args, "vl_nheads").unwrap_or(8);
    if h == 0 || !d.is_multiple_of(h) {
        return Err(format_err(
            path,
            format!("vl_nheads {h} does not divide the fusion width {d}"),
        ));
    }
    let image_size = match &visual {
        VisualConfig::Hivg(c) => c.vision.image_size,
        _ => unreachable!("CLIP-based grounders use the HiVG visual encoder"),
    };
    if let Some(s) = arg_usize(args, "imsize") {
        if s != image_size {
            return Err(format_err(
                path,
                format!("args.imsize is {s} but the vision positions make {image_size} px"),
            ));
        }
    }
    let mut cfg = GrounderConfig {
        visual,
        text,
        fusion: EncoderConfig {
            hidden: d,
            layers: count_blocks(&names, &format!("{fusion}layers."), "linear1.weight"),
            heads: h,
            ffn: shape(&format!("{fusion}layers.0.linear1.weight"))?[0],
            dropout: 0.1,
            pre_norm: names.contains(format!("{fusion}norm.weight").as_str()),
        },
        image_size,
        max_text_len: 0,
        head: BoxHead::RegMlp,
        word_head: false,
        layout,
    };
    let visual_tokens = cfg.visual_tokens();
    let positions = match &cfg.text {
        TextConfig::ClipText(t) => t.max_position_embeddings,
        TextConfig::Bert(b) => b.max_position_embeddings,
    };
    cfg.max_text_len = pos[0]
        .checked_sub(1 + visual_tokens)
        .filter(|&l| (3..=positions).contains(&l))
        .ok_or_else(|| {
            format_err(
                path,
                format!("vl_pos_embed has {} rows: not 1 + {visual_tokens} visual + at most {positions} text tokens", pos[0]),
            )
        })?;
    if let Some(q) = arg_usize(args, "max_query_len") {
        if q != cfg.max_text_len {
            return Err(format_err(
                path,
                format!(
                    "args.max_query_len is {q} but vl_pos_embed gives {}",
                    cfg.max_text_len
                ),
            ));
        }
    }
    Ok(cfg)
}

/// Our name(s) of a CLIP-VG (OpenAI CLIP) key: `(parameter, op)` pairs; a packed
/// `in_proj` gives three. `None`: not part of our model.
fn clipvg_sources(key: &str, shape: &[usize]) -> Option<Vec<(String, Source)>> {
    let one = |p: String, op: Op, shape: Vec<usize>| Some(vec![(p, Source { op, shape })]);
    let copy = |p: String| one(p, Op::Copy(key.to_string()), shape.to_vec());
    let tower = |rest: &str, to: &str| -> Option<Vec<(String, Source)>> {
        let rest = rest.strip_prefix("transformer.resblocks.")?;
        let (i, leaf) = rest.split_once('.')?;
        let base = format!("{to}encoder.layers.{i}.");
        if let Some(kind) = leaf.strip_prefix("attn.in_proj_") {
            let c = shape[0] / 3;
            let mut out = Vec::new();
            for (j, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let mut s = shape.to_vec();
                s[0] = c;
                out.push((
                    format!("{base}self_attn.{q}.{kind}"),
                    Source {
                        op: Op::Rows(key.to_string(), j * c, c),
                        shape: s,
                    },
                ));
            }
            return Some(out);
        }
        const LEAVES: &[(&str, &str)] = &[
            ("attn.out_proj.", "self_attn.out_proj."),
            ("ln_1.", "layer_norm1."),
            ("ln_2.", "layer_norm2."),
            ("mlp.c_fc.", "mlp.fc1."),
            ("mlp.c_proj.", "mlp.fc2."),
        ];
        LEAVES.iter().find_map(|(from, t)| {
            leaf.strip_prefix(from)
                .and_then(|w| copy(format!("{base}{t}{w}")))
        })
    };
    let transposed = |p: &str| {
        one(
            p.to_string(),
            Op::Transpose(key.to_string()),
            vec![shape[1], shape[0]],
        )
    };
    if let Some(rest) = key.strip_prefix("clip.visual.") {
        return match rest {
            "class_embedding" => copy("visual.embeddings.class_embedding".into()),
            "conv1.weight" => copy("visual.embeddings.patch_embedding.weight".into()),
            "positional_embedding" => copy("visual.embeddings.position_embedding.weight".into()),
            "proj" => transposed("visual_projection.weight"),
            r => {
                if let Some(w) = r.strip_prefix("ln_pre.") {
                    copy(format!("visual.pre_layrnorm.{w}"))
                } else if let Some(w) = r.strip_prefix("ln_post.") {
                    copy(format!("visual.post_layernorm.{w}"))
                } else {
                    tower(r, "visual.")
                }
            }
        };
    }
    if let Some(rest) = key.strip_prefix("clip.") {
        return match rest {
            "token_embedding.weight" => copy("text.embeddings.token_embedding.weight".into()),
            "positional_embedding" => copy("text.embeddings.position_embedding.weight".into()),
            "text_projection" => transposed("text_projection.weight"),
            "logit_scale" => copy("logit_scale".into()),
            r => match r.strip_prefix("ln_final.") {
                Some(w) => copy(format!("text.final_layer_norm.{w}")),
                None => tower(r, "text."),
            },
        };
    }
    const MAP: &[(&str, &str)] = &[
        ("ml_visu_proj.", "visual.ml_visual_projection."),
        ("vl_transformer.encoder.layers.", "vl_transformer.layers."),
        ("vl_pos_embed.", "vl_pos_embed."),
        ("reg_token.", "reg_token."),
        ("text_proj.", "text_proj."),
        ("bbox_embed.", "bbox_embed."),
    ];
    MAP.iter()
        .find_map(|(from, to)| key.strip_prefix(from).map(|rest| format!("{to}{rest}")))
        .and_then(copy)
}

/// `import clip-vg`: a released CLIP-VG checkpoint into the run folder `out`, with CLIP's
/// tokenizer (`tokenizer`: a `tokenizer.json` or a CLIP folder).
pub fn import_clipvg(
    checkpoint: &Path,
    tokenizer: &Path,
    out: &Path,
    opts: &HivgImport,
) -> Result<ImportReport> {
    let path = checkpoint;
    let ckpt = Checkpoint::open(path, "CLIP-VG")?;
    let shapes: BTreeMap<String, Vec<usize>> = ckpt
        .entries
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone()))
        .collect();
    let names: BTreeSet<&str> = shapes.keys().map(String::as_str).collect();
    let shape = shape_of(&shapes, path, "CLIP-VG");
    if names
        .iter()
        .any(|n| n.contains("cross_attn") || n.contains("base_model.model."))
    {
        return Err(format_err(
            path,
            "this is a HiVG checkpoint (bridges, peft keys): use `import hivg`",
        ));
    }
    let conv = shape("clip.visual.conv1.weight")?;
    let (cv, p) = (conv[0], conv[2]);
    let n_pos = shape("clip.visual.positional_embedding")?[0];
    let vision_layers = count_blocks(&names, "clip.visual.transformer.resblocks.", "ln_1.weight");
    let words = shape("clip.token_embedding.weight")?;
    let ct = words[1];
    let text_layers = count_blocks(&names, "clip.transformer.resblocks.", "ln_1.weight");
    let ml = shape("ml_visu_proj.weight")?;
    let levels = ml[1] / cv;
    // CLIP-VG's extract_layer: blocks 0, 3, 7, 11 of the 12 (hidden states 1, 4, 8, 12)
    let multi_layers = match (vision_layers, levels) {
        (12, 4) => vec![1, 4, 8, 12],
        (n, k) => {
            return Err(format_err(
                path,
                format!("{n} vision layers and {k} feature levels: CLIP-VG reads blocks 0, 3, 7, 11 of a 12-layer ViT-B"),
            ))
        }
    };
    let tok = clip_tokenizer(tokenizer, words[0])?;
    let th = opts.heads.map(|h| h.1);
    let vision = vision_config(
        cv,
        shape("clip.visual.transformer.resblocks.0.mlp.c_fc.weight")?[0],
        vision_layers,
        (n_pos, p),
        opts,
        path,
    )?;
    let text = text_config(
        words[0],
        ct,
        shape("clip.transformer.resblocks.0.mlp.c_fc.weight")?[0],
        text_layers,
        shape("clip.positional_embedding")?[0],
        heads(ct, th, path, "text")?,
        &tok,
    );
    let visual = HivgConfig {
        vision,
        bridge_layers: Vec::new(),
        text_layers: Vec::new(),
        multi_layers,
        text_dim: ct,
        text_len: text.max_position_embeddings,
        proj_dim: ml[0],
        contrastive_dim: shape("clip.text_projection")?[1],
        level_norm: false,
        bridge_mode: BridgeMode::PerSample,
        bridge_text: BridgeText::Hidden,
        aux_heads: false,
        patch_mask: PatchMask::Bilinear,
        bridge_ffn: 0,
    };
    let cfg = fusion_config(
        VisualConfig::Hivg(visual),
        TextConfig::ClipText(text),
        FusionLayout::clip_release(false),
        &shapes,
        &ckpt.args,
        path,
    )?;
    // the wrappers' keys that alias a clip.* tensor (one storage, same view) are not listed
    let view = |t: &gk_data::pth::TensorRef| {
        (
            t.storage.clone(),
            t.offset,
            t.shape.clone(),
            t.stride.clone(),
        )
    };
    let clip_views: BTreeSet<_> = ckpt
        .entries
        .iter()
        .filter(|(k, _)| k.starts_with("clip."))
        .map(|(_, t)| view(t))
        .collect();
    let mut sources = BTreeMap::new();
    let mut unmapped = Vec::new();
    for (key, t) in &ckpt.entries {
        match clipvg_sources(key, &t.shape) {
            Some(list) => sources.extend(list),
            None if !key.starts_with("clip.") && clip_views.contains(&view(t)) => {}
            None => unmapped.push(key.clone()),
        }
    }
    let (pairs, unused) = plan(sources, unmapped, &cfg, path)?;
    let tensors = ckpt.materialise(&pairs)?;
    let report = ckpt.report(path, &tensors, unused, cfg);
    let optim = clip_optim(report.config.image_size as u32);
    write_run(out, &ckpt, &tok, &tensors, optim, &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_wrapping_is_undone_and_keys_map() {
        let k = "clip.base_model.model.base_model.model.base_model.model.base_model.model.vision_model.encoder.layers.3.cross_attn.q_proj.base_layer.weight";
        let n = unwrap_peft(k);
        assert_eq!(
            n,
            "clip.vision_model.encoder.layers.3.cross_attn.q_proj.weight"
        );
        assert_eq!(
            hivg_key(&n, &[0, 3, 7, 11]).as_deref(),
            Some("visual.bridge.1.cross_attn.q_proj.weight")
        );
        assert_eq!(
            hivg_key(
                "clip.vision_model.encoder.layers.7.cross_adaptive_weights.1.weight",
                &[0, 3, 7, 11]
            )
            .as_deref(),
            Some("visual.bridge.2.adaptive.1")
        );
        assert_eq!(
            hivg_key(
                "clip.vision_model.encoder.layers.0.cross_gate.bias",
                &[0, 3, 7, 11]
            )
            .as_deref(),
            Some("visual.bridge.0.gate.bias")
        );
        assert_eq!(
            hivg_key("clip.text_model.embeddings.position_ids", &[]),
            None
        );
        assert_eq!(hivg_key("seg_conv1.weight", &[]), None);
        assert_eq!(
            lora_a("clip.text_model.encoder.layers.0.self_attn.k_proj.lora_A.default.weight"),
            Some((
                "clip.text_model.encoder.layers.0.self_attn.k_proj",
                "default"
            ))
        );
        assert_eq!(hivg_text_layers("unc+", 12), vec![6, 12]);
        assert_eq!(hivg_text_layers("flickr", 12), vec![12]);
    }

    #[test]
    fn clipvg_packed_projections_split_into_rows() {
        let s = clipvg_sources(
            "clip.visual.transformer.resblocks.2.attn.in_proj_weight",
            &[48, 16],
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].0, "visual.encoder.layers.2.self_attn.k_proj.weight");
        assert_eq!(
            s[1].1.op,
            Op::Rows(
                "clip.visual.transformer.resblocks.2.attn.in_proj_weight".into(),
                16,
                16
            )
        );
        assert_eq!(s[1].1.shape, vec![16, 16]);
        let b = clipvg_sources("clip.transformer.resblocks.0.attn.in_proj_bias", &[24]).unwrap();
        assert_eq!(b[2].1.shape, vec![8]);
        let t = clipvg_sources("clip.text_projection", &[8, 16]).unwrap();
        assert_eq!(t[0].0, "text_projection.weight");
        assert_eq!(t[0].1.shape, vec![16, 8]);
        assert_eq!(clipvg_sources("visu_proj.weight", &[16, 16]), None);
        assert_eq!(
            clipvg_sources("clip.transformer.resblocks.11.mlp.c_proj.bias", &[8]).unwrap()[0].0,
            "text.encoder.layers.11.mlp.fc2.bias"
        );
    }
}
