//! `import hivg` and `import clip-vg` against our PyTorch transcriptions of HiVG (on
//! transformers' `CLIPModel`) and CLIP-VG (on its own OpenAI CLIP code).
//!
//! Fixtures: `tools/reference/make_hivg_fixtures.py`: tiny models (Base: 12 vision layers,
//! bridges in 0/3/7/11; Large: 24 layers, bridges in 4/10/16/22, patch 14; widths 8-16)
//! saved in each release's format (HiVG: peft 0.3's four nested `base_model.model.`
//! prefixes, unmerged LoRA, storages tagged `cuda:0`; the same weights with newer peft's
//! `base_layer` names; the mixup-pretrained variant; a file without one bridge's trained
//! attention. CLIP-VG: half-precision CLIP weights under two names sharing storage), their
//! boxes on the four TransVG test images from each system's own transform, tokenizer
//! (a dense-id subset of CLIP's BPE, "!" = 0 as in CLIP) and forward. Tolerances: token ids
//! equal; boxes within 1e-4 of the normalised output and 0.5 px in the image (the seen
//! maxima are printed).

mod common;

use common::{f64s, max_abs_diff};
use gk_data::image_io;
use gk_models::hivg::BridgeMode;
use gk_train::import::{self, HivgImport, ImportReport};
use gk_train::infer::{self, Query};
use gk_train::run::RunDir;
use std::path::{Path, PathBuf};

fn dir(system: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../tests/fixtures/{system}_release"))
}

fn cases(system: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(system).join("cases.json")).unwrap()).unwrap()
}

fn tokenizer() -> PathBuf {
    dir("hivg").join("tokenizer.json")
}

/// The tiny towers' head counts (CLIP's 64-wide heads do not divide widths of 8 and 16).
fn opts(c: &serde_json::Value, mode: BridgeMode) -> HivgImport {
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let heads = match c.get("text_heads") {
        Some(_) => (n("vision_heads"), n("text_heads")),
        None => (n("vision_heads"), n("transformer_heads")),
    };
    HivgImport {
        heads: Some(heads),
        bridge_mode: mode,
        ..Default::default()
    }
}

type Importer = fn(&Path, &Path, &Path, &HivgImport) -> gk_train::Result<ImportReport>;

/// Imports `file` of `system` into `out`.
fn import_one(system: &str, file: &str, out: &Path, mode: BridgeMode) -> ImportReport {
    let c = cases(system);
    let importer: Importer = match system {
        "hivg" => import::import_hivg,
        _ => import::import_clipvg,
    };
    let model = &c["models"][file];
    importer(
        &dir(system).join(file),
        &tokenizer(),
        out,
        &opts(&model["config"], mode),
    )
    .unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The boxes of `idx` (case indices) grounded as one batch: (normalised, pixels).
fn ground(system: &str, run: &Path, file: &str, idx: &[usize]) -> (Vec<[f32; 4]>, Vec<[f32; 4]>) {
    let c = cases(system);
    let m = infer::open(&RunDir::open(run).unwrap()).unwrap();
    let all = c["models"][file]["cases"].as_array().unwrap();
    let images: Vec<_> = idx
        .iter()
        .map(|&i| {
            let name = all[i]["image"].as_str().unwrap();
            let path = dir(system).join(c["images"][name]["path"].as_str().unwrap());
            image_io::load_rgb(&path).unwrap()
        })
        .collect();
    let queries: Vec<Query> = idx
        .iter()
        .zip(&images)
        .map(|(&i, image)| Query {
            image,
            expr: all[i]["expr"].as_str().unwrap(),
        })
        .collect();
    let answers = m.ground(&queries).unwrap();
    (
        answers.iter().map(|a| a.model_cxcywh).collect(),
        answers.iter().map(|a| a.bbox_xyxy).collect(),
    )
}

fn worst(ours: &[[f32; 4]], theirs: &[Vec<f64>]) -> f64 {
    ours.iter()
        .zip(theirs)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (f64::from(*x) - y).abs()))
        .fold(0.0, f64::max)
}

/// Every model file, each case alone (batch 1): the token ids, then the boxes.
fn per_sample_boxes(system: &str) {
    let c = cases(system);
    let tmp = tempfile::tempdir().unwrap();
    let tok = gk_data::tokenize::TextTokenizer::from_file(&tokenizer())
        .unwrap()
        .with_pad_id(0);
    for (file, model) in c["models"].as_object().unwrap() {
        let out = tmp.path().join(file);
        let report = import_one(system, file, &out, BridgeMode::PerSample);
        // what the reference lists as unused, less what our model reads that HiVG's box
        // does not (CLIP's projections and post-norm, for the pooled and contrastive outputs)
        let theirs: Vec<&str> = model["unused_keys"]
            .as_array()
            .unwrap()
            .iter()
            .chain(model["buffers"].as_array().unwrap())
            .map(|v| v.as_str().unwrap())
            .collect();
        for k in &report.unused {
            assert!(
                theirs.contains(&k.as_str()),
                "{file}: {k} is unused here only"
            );
        }
        let cases = model["cases"].as_array().unwrap();
        let (mut w_model, mut w_px) = (0f64, 0f64);
        for (i, case) in cases.iter().enumerate() {
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let enc = tok
                .encode(case["expr"].as_str().unwrap(), report.config.max_text_len)
                .unwrap();
            assert_eq!(enc.ids, ids, "{file} case {i}");
            assert_eq!(enc.truncated, case["truncated"].as_bool().unwrap());
            let (norm, px) = ground(system, &out, file, &[i]);
            w_model = w_model.max(worst(&norm, &[f64s(&case["pred_cxcywh"])]));
            w_px = w_px.max(worst(&px, &[f64s(&case["bbox_xyxy_clipped"])]));
        }
        println!(
            "{system} {file}: {} cases, max |box - reference| {w_model:.2e} (normalised), {w_px:.2e} px; {} LoRA pairs merged, {} unused keys",
            cases.len(),
            report.lora_merged,
            report.unused.len()
        );
        assert!(w_model < 1e-4 && w_px < 0.5, "{file}: {w_model} {w_px}");
    }
}

#[test]
fn imported_hivg_gives_hivgs_boxes_at_batch_one() {
    per_sample_boxes("hivg");
}

#[test]
fn imported_clipvg_gives_clipvgs_boxes() {
    per_sample_boxes("clipvg");
}

/// HiVG's batch-mixing bridges at the fixture's batch and order, and the per-sample mode
/// on the same batch (which equals each sample alone).
#[test]
fn hivg_batched_bridges_mix_as_hivgs_code_does() {
    let c = cases("hivg");
    let tmp = tempfile::tempdir().unwrap();
    for (file, model) in c["models"].as_object().unwrap() {
        let b = &model["batched"];
        let order: Vec<usize> = b["order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert!(order.len() >= 4);
        let rows =
            |k: &str| -> Vec<Vec<f64>> { b[k].as_array().unwrap().iter().map(f64s).collect() };
        let batched = tmp.path().join(format!("{file}.batched"));
        let report = import_one("hivg", file, &batched, BridgeMode::Batched);
        let m = infer::open(&RunDir::open(&batched).unwrap()).unwrap();
        assert!(m.info().batch_dependent.is_some());
        let (norm, px) = ground("hivg", &batched, file, &order);
        let (wb, wp) = (
            worst(&norm, &rows("pred_cxcywh")),
            worst(&px, &rows("bbox_xyxy_clipped")),
        );
        let plain = tmp.path().join(format!("{file}.per_sample"));
        import_one("hivg", file, &plain, BridgeMode::PerSample);
        let (norm_ps, _) = ground("hivg", &plain, file, &order);
        let ws = worst(&norm_ps, &rows("per_sample_pred_cxcywh"));
        let mixing = b["max_abs_diff_batched_vs_per_sample"].as_f64().unwrap();
        println!(
            "{file}: batch {} in order {order:?}: batched max |box - HiVG| {wb:.2e} ({wp:.2e} px), per-sample {ws:.2e}; the mixing moves boxes by up to {mixing:.3}",
            order.len(),
        );
        assert!(matches!(
            &report.config.visual,
            gk_models::grounder::VisualConfig::Hivg(h) if h.bridge_mode == BridgeMode::Batched
        ));
        assert!(wb < 1e-4 && wp < 0.5 && ws < 1e-4, "{file}: {wb} {wp} {ws}");
        assert!(
            mixing > 1e-3,
            "{file}: the fixture's batch does not exercise the mixing"
        );
    }
}

/// The same weights under newer peft's `base_layer` names import to the same tensors.
#[test]
fn newer_peft_names_import_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let ra = import_one("hivg", "hivg_b_tiny_uncplus.pth", &a, BridgeMode::PerSample);
    let rb = import_one(
        "hivg",
        "hivg_b_tiny_uncplus_base_layer.pth",
        &b,
        BridgeMode::PerSample,
    );
    assert_eq!(
        (ra.tensors, ra.values, ra.lora_merged),
        (rb.tensors, rb.values, rb.lora_merged)
    );
    assert_eq!(ra.config, rb.config);
    let dev = candle_core::Device::Cpu;
    let wa = gk_train::weights::read_safetensors(&a.join("best.safetensors"), &dev).unwrap();
    let wb = gk_train::weights::read_safetensors(&b.join("best.safetensors"), &dev).unwrap();
    assert_eq!(wa.len(), wb.len());
    for (k, t) in &wa {
        assert_eq!(max_abs_diff(t, &wb[k]), 0.0, "{k}");
    }
}

#[test]
fn a_hivg_file_without_its_bridge_weights_is_refused() {
    let c = cases("hivg");
    let tmp = tempfile::tempdir().unwrap();
    let file = "hivg_b_tiny_missing_bridge.pth";
    let e = import::import_hivg(
        &dir("hivg").join(file),
        &tokenizer(),
        &tmp.path().join("x"),
        &opts(
            &c["models"]["hivg_b_tiny_uncplus.pth"]["config"],
            BridgeMode::PerSample,
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("bridges' trained attention weights are missing")
            && e.contains("layers.3.cross_attn.k_proj.weight"),
        "{e}"
    );
    assert!(
        !tmp.path().join("x").exists(),
        "nothing written for a refused file"
    );
    // a CLIP-VG file is not a HiVG one, and the other way round
    let e = import::import_hivg(
        &dir("clipvg").join("clipvg_b_tiny.pth"),
        &tokenizer(),
        &tmp.path().join("y"),
        &HivgImport::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a HiVG checkpoint"), "{e}");
    let e = import::import_clipvg(
        &dir("hivg").join("hivg_b_tiny_uncplus.pth"),
        &tokenizer(),
        &tmp.path().join("z"),
        &HivgImport::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("use `import hivg`"), "{e}");
}

/// The bench presets (`GrounderConfig::hivg_b16_release`, `clipvg_b16`) are what the
/// importers make, but for the sizes.
#[test]
fn release_presets_match_the_imports() {
    use gk_models::grounder::{GrounderConfig, VisualConfig};
    let tmp = tempfile::tempdir().unwrap();
    for (system, file, preset) in [
        (
            "hivg",
            "hivg_b_tiny_uncplus.pth",
            GrounderConfig::hivg_b16_release(),
        ),
        ("clipvg", "clipvg_b_tiny.pth", GrounderConfig::clipvg_b16()),
    ] {
        let got = import_one(system, file, &tmp.path().join(file), BridgeMode::PerSample).config;
        assert_eq!(got.layout, preset.layout, "{file}");
        assert_eq!(got.fusion.pre_norm, preset.fusion.pre_norm, "{file}");
        assert_eq!(
            (got.image_size, got.max_text_len),
            (preset.image_size, preset.max_text_len)
        );
        let (VisualConfig::Hivg(a), VisualConfig::Hivg(b)) = (&got.visual, &preset.visual) else {
            panic!("{file}: not HiVG's visual encoder");
        };
        assert_eq!(
            (
                &a.bridge_layers,
                &a.multi_layers,
                a.patch_mask,
                a.level_norm,
                a.aux_heads,
                a.bridge_mode
            ),
            (
                &b.bridge_layers,
                &b.multi_layers,
                b.patch_mask,
                b.level_norm,
                b.aux_heads,
                b.bridge_mode
            ),
            "{file}"
        );
    }
}

/// `keep_lora`: the pairs stay a LoRA set (rank 4, alpha 2 here) on the towers' and the
/// bridges' attention, and the run still answers with HiVG's boxes (merged at load).
#[test]
fn hivg_lora_kept_as_a_set_gives_the_same_boxes() {
    let c = cases("hivg");
    let file = "hivg_b_tiny_uncplus.pth";
    let model = &c["models"][file];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("kept");
    let report = import::import_hivg(
        &dir("hivg").join(file),
        &tokenizer(),
        &out,
        &HivgImport {
            keep_lora: true,
            ..opts(&model["config"], BridgeMode::PerSample)
        },
    )
    .unwrap();
    assert_eq!((report.lora_kept, report.lora_merged), (112, 0));
    let w = gk_train::weights::read_safetensors(
        &out.join("best.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for k in [
        "visual.encoder.layers.0.self_attn.q_proj.lora_A.default.weight",
        "visual.bridge.1.cross_attn.out_proj.lora_B.default.weight",
        "text.encoder.layers.11.self_attn.v_proj.lora_A.default.weight",
    ] {
        assert!(w.contains_key(k), "{k} missing");
    }
    let cases = model["cases"].as_array().unwrap();
    let idx: Vec<usize> = (0..cases.len()).collect();
    let mut worst_box = 0f64;
    for &i in &idx {
        let (norm, _) = ground("hivg", &out, file, &[i]);
        worst_box = worst_box.max(worst(&norm, &[f64s(&cases[i]["pred_cxcywh"])]));
    }
    assert!(worst_box < 1e-4, "{worst_box}");
}
