//! CLIP (with and without LoRA), BERT and Swin against transformers 5.23 on tiny random models.
//!
//! Fixtures: `tools/reference/gen_fixtures.py` (tiny `CLIPModel` / `BertModel`, random
//! weights with std 0.2, saved in HF layout with their inputs and every hidden state).
//! Tolerance: max |diff| <= 1e-4 on every hidden state, pooled output and embedding.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use gk_models::bert::{Bert, BertConfig};
use gk_models::clip::{ClipConfig, ClipModel};
use std::collections::HashMap;
use std::path::PathBuf;

const TOL: f32 = 1e-4;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(p)
}

fn load(p: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(p), &Device::Cpu).unwrap()
}

fn vb(p: &str) -> VarBuilder<'static> {
    VarBuilder::from_tensors(load(p), DType::F32, &Device::Cpu)
}

fn max_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor) -> f32 {
    let e = max_err(ours, theirs);
    println!("{what}: max |diff| = {e:.3e}");
    assert!(e <= TOL, "{what}: max |diff| {e} > {TOL}");
    e
}

#[test]
fn clip_tiny_matches_transformers() {
    let cfg: ClipConfig =
        serde_json::from_str(&std::fs::read_to_string(fixture("clip_tiny/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg.vision_config, gk_models::clip::ClipVisionConfig::tiny());
    let model = ClipModel::new(vb("clip_tiny/model.safetensors"), &cfg).unwrap();
    let io = load("clip_tiny/io.safetensors");
    let img = model.encode_image(&io["pixel_values"]).unwrap();
    for (i, h) in img.tower.hidden_states.iter().enumerate() {
        check(
            &format!("vision_hidden.{i}"),
            h,
            &io[&format!("vision_hidden.{i}")],
        );
    }
    check(
        "vision_last",
        &img.tower.last_hidden_state,
        &io["vision_last"],
    );
    check("vision_pooled", &img.tower.pooled, &io["vision_pooled"]);
    check("image_embeds", &img.embeds, &io["image_embeds"]);

    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let txt = model
        .encode_text(&ids, Some(&io["attention_mask"]))
        .unwrap();
    for (i, h) in txt.tower.hidden_states.iter().enumerate() {
        check(
            &format!("text_hidden.{i}"),
            h,
            &io[&format!("text_hidden.{i}")],
        );
    }
    check("text_last", &txt.tower.last_hidden_state, &io["text_last"]);
    check("text_pooled", &txt.tower.pooled, &io["text_pooled"]);
    check("text_embeds", &txt.embeds, &io["text_embeds"]);
    check(
        "logits_per_image",
        &model.logits_per_image(&img.embeds, &txt.embeds).unwrap(),
        &io["logits_per_image"],
    );
}

#[test]
fn clip_position_embeddings_interpolate_like_transformers() {
    let cfg = ClipConfig::tiny();
    let model = ClipModel::new(vb("clip_tiny/model.safetensors"), &cfg).unwrap();
    let io = load("clip_tiny/io.safetensors");
    check(
        "pos_embed_48",
        &model.vision.position_embeddings(6, 6).unwrap(),
        &io["pos_embed_48"],
    );
    let out = model.vision.forward(&io["pixel_values_48"]).unwrap();
    check(
        "vision_last_48",
        &out.last_hidden_state,
        &io["vision_last_48"],
    );
    check("vision_pooled_48", &out.pooled, &io["vision_pooled_48"]);
}

fn bert_io_check(model: &Bert) {
    let io = load("bert_tiny/io.safetensors");
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let tt = io["token_type_ids"].to_dtype(DType::U32).unwrap();
    let out = model
        .forward(&ids, &io["attention_mask"], Some(&tt))
        .unwrap();
    for (i, h) in out.hidden_states.iter().enumerate() {
        check(&format!("bert hidden.{i}"), h, &io[&format!("hidden.{i}")]);
    }
    check("bert last", &out.last_hidden_state, &io["last"]);
    check("bert pooled", out.pooled.as_ref().unwrap(), &io["pooled"]);
}

#[test]
fn bert_tiny_matches_transformers() {
    let cfg: BertConfig =
        serde_json::from_str(&std::fs::read_to_string(fixture("bert_tiny/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg.hidden_act, gk_models::nn::Activation::Gelu);
    bert_io_check(&Bert::new(vb("bert_tiny/model.safetensors"), &cfg).unwrap());
}

#[test]
fn bert_loads_with_prefix_and_gamma_beta_names() {
    let cfg: BertConfig =
        serde_json::from_str(&std::fs::read_to_string(fixture("bert_tiny/config.json")).unwrap())
            .unwrap();
    // the pytorch_pretrained_bert / TF-converted layout: `bert.` prefix, LayerNorm gamma/beta
    let renamed: HashMap<String, Tensor> = load("bert_tiny/model.safetensors")
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            (format!("bert.{k}"), v)
        })
        .collect();
    let vb = VarBuilder::from_tensors(renamed, DType::F32, &Device::Cpu);
    bert_io_check(&Bert::new(vb, &cfg).unwrap());
}

/// RoIAlign against `torchvision.ops.roi_align`: 8 boxes (whole map, fractional, across
/// each border, sub-pixel, zero width, outside) x 4 settings (bins, scale, fixed and
/// adaptive sampling, aligned or not); outputs and the gradient of `sum(out * w)`.
/// Tolerance 1e-4 (issue 4); the max error seen is printed.
#[test]
fn roi_align_matches_torchvision_forward_and_backward() {
    use gk_models::roi_align::{roi_align, Roi, RoiAlignConfig};
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/roi/golden.safetensors");
    let g = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let feats = &g["features"]; // [B, C, H, W]
    let (b, c, h, w) = feats.dims4().unwrap();
    // channels-last [B, H*W, C], as a Var for the gradient
    let x = candle_core::Var::from_tensor(
        &feats
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((b, h * w, c))
            .unwrap(),
    )
    .unwrap();
    let rois: Vec<Roi> = g["rois"]
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| Roi {
            batch: r[0] as usize,
            xyxy: [r[1], r[2], r[3], r[4]],
        })
        .collect();
    let configs = [
        ("a", (2, 2), 1.0, 2, true),
        ("b", (3, 2), 0.5, 0, false),
        ("c", (2, 3), 1.0, -1, true),
        ("d", (1, 1), 0.25, 0, true),
    ];
    let mut worst = (0f32, 0f32);
    for (name, output, spatial_scale, sampling_ratio, aligned) in configs {
        let cfg = RoiAlignConfig {
            output,
            spatial_scale,
            sampling_ratio,
            aligned,
        };
        let out = roi_align(x.as_tensor(), (h, w), &rois, &cfg).unwrap(); // [R, PH*PW, C]
        let (ph, pw) = output;
        let r = rois.len();
        // torchvision's [R, C, PH, PW]
        let ours = out
            .reshape((r, ph, pw, c))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap();
        let e = max_err(&ours, &g[&format!("{name}_out")]);
        let weight = &g[&format!("{name}_weight")];
        let loss = (ours * weight).unwrap().sum_all().unwrap();
        let grad = loss.backward().unwrap().get(&x).unwrap().clone();
        let grad = grad
            .reshape((b, h, w, c))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap();
        let eg = max_err(&grad, &g[&format!("{name}_grad")]);
        println!("roi_align {name}: forward {e:.2e}, backward {eg:.2e}");
        assert!(
            e <= 1e-4 && eg <= 1e-4,
            "{name}: forward {e}, backward {eg}"
        );
        worst = (worst.0.max(e), worst.1.max(eg));
    }
    println!(
        "roi_align max abs error: forward {:.2e}, backward {:.2e}",
        worst.0, worst.1
    );
}

/// The tiny CLIP with two stacked LoRA sets (`gen_fixtures.py --only lora`: s1 on q/v, s2 on
/// k, the attention output and fc1, in both towers, B non-zero) against the same sets
/// applied in torch; then the merged model (sets folded into the weights) against both.
#[test]
fn clip_with_stacked_lora_matches_torch_and_merges() {
    let mut cfg: ClipConfig =
        serde_json::from_str(&std::fs::read_to_string(fixture("clip_tiny/config.json")).unwrap())
            .unwrap();
    let sets: Vec<gk_models::lora::LoraConfig> =
        serde_json::from_str(&std::fs::read_to_string(fixture("clip_lora/sets.json")).unwrap())
            .unwrap();
    cfg.vision_config.lora = sets.clone();
    cfg.text_config.lora = sets;
    let mut tensors = load("clip_tiny/model.safetensors");
    let lora = load("clip_lora/lora.safetensors");
    assert_eq!(lora.len(), 2 * 2 * 2 * 5, "A and B per targeted layer");
    tensors.extend(lora);
    let model = ClipModel::new(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let io = load("clip_tiny/io.safetensors");
    let want = load("clip_lora/io.safetensors");
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let run = |m: &ClipModel, tag: &str| {
        let img = m.encode_image(&io["pixel_values"]).unwrap();
        let txt = m.encode_text(&ids, Some(&io["attention_mask"])).unwrap();
        check(
            &format!("{tag} vision_last"),
            &img.tower.last_hidden_state,
            &want["vision_last"],
        );
        check(
            &format!("{tag} image_embeds"),
            &img.embeds,
            &want["image_embeds"],
        );
        check(
            &format!("{tag} text_last"),
            &txt.tower.last_hidden_state,
            &want["text_last"],
        );
        check(
            &format!("{tag} text_embeds"),
            &txt.embeds,
            &want["text_embeds"],
        );
    };
    run(&model, "lora");
    run(&model.merge_lora().unwrap(), "merged");
}

/// Swin against transformers 5.23 (`gen_fixtures.py --only swin`: 3 stages, window 4, on
/// 56x56 and 50x60 inputs, so padded, shifted and single windows, odd merges and a padded
/// patch embedding all occur). Weights in the Hub's classic key layout.
#[test]
fn swin_tiny_matches_transformers() {
    use gk_models::swin::{Swin, SwinConfig};
    let cfg: SwinConfig =
        serde_json::from_str(&std::fs::read_to_string(fixture("swin_tiny/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg, SwinConfig::tiny());
    let swin = Swin::new(vb("swin_tiny/model.safetensors"), &cfg).unwrap();
    let io = load("swin_tiny/io.safetensors");
    for tag in ["", "_odd"] {
        let out = swin.forward(&io[&format!("pixel_values{tag}")]).unwrap();
        for (i, s) in out.stages.iter().enumerate() {
            check(&format!("stage{i}{tag}"), s, &io[&format!("stage{i}{tag}")]);
        }
        check(
            &format!("last{tag}"),
            &out.last_hidden_state,
            &io[&format!("last{tag}")],
        );
        check(
            &format!("pooled{tag}"),
            &out.pooled,
            &io[&format!("pooled{tag}")],
        );
    }
}
