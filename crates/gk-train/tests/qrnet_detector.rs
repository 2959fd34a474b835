//! QRNet from its released detector: an mmdet Swin Mask R-CNN checkpoint's backbone in our
//! Swin, against our transcription of mmdet's `SwinTransformer` (which equals the original
//! class to the bit, `tools/reference/make_mmdet_swin_fixtures.py`), and a QRNet that
//! trains from it.
//!
//! Fixture: a Swin-S-shaped detector at embed 4, depths [2, 2, 4, 2], heads [1, 2, 4, 8],
//! window 7, saved as mmcv does (`meta`, `state_dict`, `optimizer`, `amp`), and its
//! stage features on an 88-px QRNet canvas (stages 22, 11, 6, 3: padded windows, the
//! shift mask, odd merging) and on a 37x50 input. Tolerance 1e-4 absolute (f32 summation
//! order; seen below 1e-5).

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use common::{max_abs_diff, train_losses};
use gk_models::nn::LayerNorm;
use gk_models::swin::{Swin, SwinConfig};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mmdet_swin")
}

fn detector() -> PathBuf {
    fixtures().join("mask_rcnn_swin_mini.pth")
}

fn swin_config(det: &gk_train::import::MmdetBackbone) -> SwinConfig {
    SwinConfig {
        embed_dim: det.embed_dim,
        depths: det.depths.clone(),
        num_heads: det.heads.clone(),
        window_size: 7,
        patch_size: 4,
        fixed_windows: true,
        ..SwinConfig::swin_s()
    }
}

/// `[1, C, H, W]` -> `[1, H*W, C]`.
fn tokens(nchw: &Tensor) -> Tensor {
    nchw.flatten_from(2).unwrap().transpose(1, 2).unwrap()
}

#[test]
fn detector_backbone_features_match_mmdet_swin() {
    let det = gk_train::import::mmdet_swin_backbone(&detector()).unwrap();
    assert_eq!(
        (det.embed_dim, det.depths.as_slice(), det.heads.as_slice()),
        (4, &[2, 2, 4, 2][..], &[1, 2, 4, 8][..])
    );
    // the detector's heads and the recomputed index buffers are all that is left out
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap())
            .unwrap();
    let heads: Vec<&str> = cases["backbone_init"]["unused_prefixes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for k in &det.unused {
        assert!(
            heads.iter().any(|h| k.starts_with(h)) || k.ends_with("relative_position_index"),
            "{k}"
        );
    }
    assert_eq!(
        det.unused.len(),
        cases["backbone_init"]["n_unused"].as_u64().unwrap() as usize + 10
    );
    let cfg = swin_config(&det);
    let vb = VarBuilder::from_tensors(det.tensors.clone(), DType::F32, &Device::Cpu);
    let swin = Swin::backbone(vb.pp("swin"), &cfg).unwrap();
    let io =
        candle_core::safetensors::load(fixtures().join("io.safetensors"), &Device::Cpu).unwrap();
    let mut worst = 0f32;
    for case in ["", "odd."] {
        let out = swin.forward(&io[&format!("{case}pixels")]).unwrap();
        for i in 0..4 {
            let c = cfg.stage_dim(i);
            let norm = LayerNorm::new(vb.pp(format!("out_norm.{i}")), c, 1e-5).unwrap();
            let ours = norm.forward(&out.stages[i]).unwrap();
            let theirs = tokens(&io[&format!("{case}stage{i}")]);
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-4, "{case}stage{i}: {d}");
            worst = worst.max(d);
            let w = vb.pp(format!("lateral.{i}"));
            let lateral = candle_nn::Linear::new(
                w.get((16, c), "weight").unwrap(),
                Some(w.get(16, "bias").unwrap()),
            );
            let d = max_abs_diff(
                &lateral.forward(&ours).unwrap(),
                &tokens(&io[&format!("{case}lateral{i}")]),
            );
            assert!(d < 1e-4, "{case}lateral{i}: {d}");
            worst = worst.max(d);
        }
    }
    println!("max |ours - mmdet Swin| over stages and laterals: {worst:.2e}");
    // transformers' windows (one unshifted window on grids of 7 or less) are another function
    // on stages 2 and 3 (6x6 and 3x3 grids)
    let hf = SwinConfig {
        fixed_windows: false,
        ..cfg.clone()
    };
    let out = Swin::backbone(vb.pp("swin"), &hf)
        .unwrap()
        .forward(&io["pixels"])
        .unwrap();
    let norm = LayerNorm::new(vb.pp("out_norm.3"), cfg.stage_dim(3), 1e-5).unwrap();
    let d = max_abs_diff(
        &norm.forward(&out.stages[3]).unwrap(),
        &tokens(&io["stage3"]),
    );
    assert!(
        d > 1e-2,
        "transformers' windows should differ on small grids: {d}"
    );
}

/// `train` with a `[[pretrained]]` mmdet entry: a QRNet shaped like the detector starts
/// from its backbone (kept frozen here, so after training it still equals the file) and
/// learns on the tiny benchmark: the loss falls.
#[test]
fn qrnet_trains_from_the_detector() {
    use gk_data::synth::{generate, SynthConfig};
    use gk_models::grounder::{GrounderConfig, VisualConfig};
    use gk_models::qrnet::QrNetConfig;
    use gk_train::optim::ParamGroup;
    use gk_train::train::{self, PretrainedConfig, PretrainedFormat, RunConfig, TrainOptions};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let det = gk_train::import::mmdet_swin_backbone(&detector()).unwrap();
    let mut cfg = RunConfig::synth(&data, 10);
    let mut model = GrounderConfig::tiny();
    model.image_size = 64;
    model.max_text_len = 16;
    model.visual = VisualConfig::QrNet(QrNetConfig {
        swin: SwinConfig {
            image_size: 64,
            ..swin_config(&det)
        },
        neck_dim: 16,
        reduction: 4,
        ..QrNetConfig::tiny(model.text_dim())
    });
    cfg.model = model;
    cfg.loss.words = 0.0; // no word head on the TransVG-style head
    cfg.optim.batch_size = 8;
    cfg.optim.warmup_steps = 2;
    cfg.optim.eval_every = 1000;
    cfg.optim.lr = 1e-3;
    cfg.optim.augment = gk_data::transforms::TransformConfig::eval(64);
    cfg.optim.groups = vec![ParamGroup {
        prefix: "visual.swin.".into(),
        lr_scale: 0.0,
    }];
    cfg.pretrained = vec![PretrainedConfig {
        file: detector(),
        from: "backbone.".into(),
        to: "visual.".into(),
        strict: true,
        format: PretrainedFormat::MmdetSwin,
    }];
    let run = train::prepare(&dir.path().join("r"), cfg).unwrap();
    train::train(&run, &TrainOptions::default()).unwrap();
    let losses = train_losses(&run);
    assert!(
        losses.len() >= 2 && losses.last().unwrap() < &(losses[0] * 0.8),
        "loss did not fall: {losses:?}"
    );
    let trained =
        gk_train::weights::read_safetensors(&run.file("model.safetensors"), &Device::Cpu).unwrap();
    let mut checked = 0;
    for (name, t) in &det.tensors {
        if let Some(ours) = trained.get(&format!("visual.{name}")) {
            if name.starts_with("swin.") {
                assert_eq!(max_abs_diff(ours, t), 0.0, "{name} moved although frozen");
                checked += 1;
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} backbone tensors found in the run"
    );
}
