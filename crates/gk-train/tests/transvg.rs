//! `import transvg` against TransVG's own model code.
//!
//! Fixtures: `tools/reference/make_transvg_fixtures.py` (tiny-width TransVG models saved by
//! torch 2.14 in the zip container and in the legacy one, their boxes on four images from
//! TransVG's test transform and text code, and broken checkpoints). Tolerances: the
//! letterboxed canvas bit for bit (0 max error: Pillow's resize and torchvision's
//! normalisation reproduced exactly), token ids equal, boxes within 1e-4 of the model's
//! normalised output and 0.5 px in the image (seen: 2.7e-6 and 1.4e-3 px: f32 summation order).

mod common;

use common::f64s;
use gk_data::image_io::{self, Normalize, Resize};
use gk_train::infer::{self, Query};
use gk_train::run::RunDir;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/transvg")
}

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap()
}

#[test]
fn imported_models_give_transvgs_boxes() {
    let c = cases();
    let dir = tempfile::tempdir().unwrap();
    for (file, model) in c["models"].as_object().unwrap() {
        let out = dir.path().join(file);
        let report = gk_train::import::import_transvg(
            &fixtures().join(file),
            &fixtures().join("vocab.txt"),
            &out,
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            report.tensors as u64,
            model["n_tensors"].as_u64().unwrap(),
            "{file}"
        );
        assert_eq!(
            report.values as u64,
            model["n_values"].as_u64().unwrap(),
            "{file}"
        );
        assert!(report.unused.is_empty(), "{file}: {:?}", report.unused);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join("best.safetensors"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o644,
                0o644,
                "run files are readable like the rest: {mode:o}"
            );
        }
        let cfg = &model["config"];
        assert_eq!(
            report.config.max_text_len as u64,
            cfg["max_query_len"].as_u64().unwrap()
        );
        let m = infer::open(&RunDir::open(&out).unwrap()).unwrap();
        assert_eq!(m.info().kind, "transvg");
        let tok = gk_data::tokenize::bert_wordpiece(&fixtures().join("vocab.txt"), true).unwrap();
        let (mut worst_model, mut worst_px) = (0f64, 0f64);
        for case in model["cases"].as_array().unwrap() {
            let image = image_io::load_rgb(
                &fixtures()
                    .join("images")
                    .join(case["image"].as_str().unwrap()),
            )
            .unwrap();
            let expr = case["expr"].as_str().unwrap();
            let ids: Vec<u64> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let enc = tok.encode(expr, report.config.max_text_len).unwrap();
            assert_eq!(
                enc.ids.iter().map(|&i| u64::from(i)).collect::<Vec<_>>(),
                ids,
                "{file} `{expr}`"
            );
            let a = &m
                .ground(&[Query {
                    image: &image,
                    expr,
                }])
                .unwrap()[0];
            for (o, w) in a.model_cxcywh.iter().zip(f64s(&case["pred_cxcywh"])) {
                worst_model = worst_model.max((f64::from(*o) - w).abs());
            }
            for (o, w) in a.bbox_xyxy.iter().zip(f64s(&case["bbox_xyxy_clipped"])) {
                worst_px = worst_px.max((f64::from(*o) - w).abs());
            }
        }
        println!("{file}: max |box - TransVG| {worst_model:.2e} (normalised), {worst_px:.2e} px");
        assert!(
            worst_model < 1e-4 && worst_px < 0.5,
            "{file}: {worst_model} {worst_px}"
        );
    }
}

#[test]
fn the_letterbox_is_transvgs_canvas_to_the_bit() {
    let c = cases();
    let io = candle_core::safetensors::load(
        fixtures().join("r50_tiny.io.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let side = c["imsize"].as_u64().unwrap() as u32;
    for (i, case) in c["models"]["r50_tiny.pth"]["cases"].as_array().unwrap()[..2]
        .iter()
        .enumerate()
    {
        let name = case["image"].as_str().unwrap();
        let image = image_io::load_rgb(&fixtures().join("images").join(name)).unwrap();
        let lb = image_io::letterbox(
            &image,
            side,
            Resize::PilBilinear,
            &Normalize::IMAGENET,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let want = &c["images"][name];
        assert_eq!(
            u64::from(lb.frame.width),
            want["new_w"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            u64::from(lb.frame.height),
            want["new_h"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            lb.frame.pad_x as u64,
            want["left"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            lb.frame.pad_y as u64,
            want["top"].as_u64().unwrap(),
            "{name}"
        );
        let row = lb
            .pixels
            .narrow(1, side as usize / 2, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let ours = row.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let theirs = io[&format!("case{i}.pixels_row")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(worst, 0.0, "{name}: canvas row differs by up to {worst}");
        let all = lb.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let sum: f64 = all.iter().map(|&v| f64::from(v)).sum();
        let abs: f64 = all.iter().map(|&v| f64::from(v).abs()).sum();
        let want_sum = io[&format!("case{i}.pixels_sum")]
            .to_scalar::<f64>()
            .unwrap();
        let want_abs = io[&format!("case{i}.pixels_abs_sum")]
            .to_scalar::<f64>()
            .unwrap();
        // sums of 1.2M values in different orders: equal canvases agree to ~1e-9 relative
        assert!(
            (sum - want_sum).abs() <= 1e-6 * want_abs,
            "{name}: {sum} vs {want_sum}"
        );
        assert!(
            (abs - want_abs).abs() <= 1e-6 * want_abs,
            "{name}: {abs} vs {want_abs}"
        );
    }
}

#[test]
fn wrong_checkpoints_are_refused_by_name() {
    let c = cases();
    let dir = tempfile::tempdir().unwrap();
    let import = |file: &str| {
        gk_train::import::import_transvg(
            &fixtures().join(file),
            &fixtures().join("vocab.txt"),
            &dir.path().join(file),
        )
        .err()
        .unwrap_or_else(|| panic!("{file} imported"))
        .to_string()
    };
    let e = import("detr_r50_tiny.pth");
    assert!(
        e.contains("DETR detection checkpoint") && e.contains("detr_r50_tiny.pth"),
        "{e}"
    );
    let bad = &c["invalid"]["bad_shape.pth"];
    let e = import("bad_shape.pth");
    let (have, want) = (bad["shape"].to_string(), bad["expected"].to_string());
    assert!(
        e.contains("text_proj.weight")
            && e.contains(&have.replace(',', ", "))
            && e.contains(&want.replace(',', ", ")),
        "{e}"
    );
    let e = import("missing_key.pth");
    assert!(e.contains("vl_pos_embed"), "{e}");
    // a vocabulary of the wrong size
    let vocab = dir.path().join("vocab_short.txt");
    let text = std::fs::read_to_string(fixtures().join("vocab.txt")).unwrap();
    std::fs::write(&vocab, text.lines().take(60).collect::<Vec<_>>().join("\n")).unwrap();
    let e = gk_train::import::import_transvg(
        &fixtures().join("r50_tiny.pth"),
        &vocab,
        &dir.path().join("v"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vocab_short.txt") && e.contains("60 tokens") && e.contains("72 rows"),
        "{e}"
    );
    // nothing was left behind by the failed imports
    assert!(!dir.path().join("v").join("best.safetensors").exists());
}
