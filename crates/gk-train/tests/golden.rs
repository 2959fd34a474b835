//! Box losses against TransVG's `trans_vg_loss` in torch (values and gradients).
//!
//! Python (tools/reference/gen_fixtures.py):
//! ```python
//! loss_l1 = F.l1_loss(pred, tgt, reduction="none").sum() / B
//! loss_giou = (1 - torch.diag(generalized_box_iou(xyxy(pred), xyxy(tgt)))).sum() / B
//! (loss_l1 + loss_giou).backward()  # -> grad_pred
//! ```
//! Tolerance 1e-5 on values and gradients.

use candle_core::{Device, IndexOp, Tensor, Var};
use gk_train::losses::{box_losses, BoxLossConfig, LossParts};

#[test]
fn box_losses_and_gradients_match_torch() {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/box/golden.safetensors");
    let g = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let pred = Var::from_tensor(&g["pred_cxcywh"]).unwrap();
    let mut parts = LossParts::new();
    box_losses(
        pred.as_tensor(),
        &g["tgt_cxcywh"],
        &BoxLossConfig::default(),
        &mut parts,
    )
    .unwrap();
    let v: std::collections::HashMap<_, _> = parts.values().unwrap().into_iter().collect();
    let want_l1 = g["loss_l1"].to_scalar::<f32>().unwrap();
    let want_giou = g["loss_giou"].to_scalar::<f32>().unwrap();
    println!(
        "l1 {} vs {want_l1}, giou {} vs {want_giou}",
        v["l1"], v["giou"]
    );
    assert!((v["l1"] - want_l1).abs() < 1e-5);
    assert!((v["giou"] - want_giou).abs() < 1e-5);

    let grads = parts.total().unwrap().backward().unwrap();
    let ours = grads.get(&pred).unwrap().to_vec2::<f32>().unwrap();
    let want = g["grad_pred"].to_vec2::<f32>().unwrap();
    // Row 0 is an identical pair and row 1 has equal heights: both need torch's subgradient
    // choices (sign(0) = 0, max/min ties split 1/2 : 1/2), which we follow.
    let mut worst = 0f32;
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        for k in 0..4 {
            let e = (a[k] - b[k]).abs();
            assert!(e < 1e-5, "grad row {i} col {k}: {} vs {}", a[k], b[k]);
            worst = worst.max(e);
        }
    }
    println!("max grad |diff|: {worst:.2e}");
}

#[test]
fn weights_of_zero_drop_a_part_and_all_zero_is_an_error() {
    let dev = Device::Cpu;
    let pred = Tensor::new(&[[0.5f32, 0.5, 0.2, 0.2]], &dev).unwrap();
    let tgt = Tensor::new(&[[0.4f32, 0.5, 0.2, 0.3]], &dev).unwrap();
    let mut parts = LossParts::new();
    box_losses(
        &pred,
        &tgt,
        &BoxLossConfig {
            l1: 0.0,
            giou: 2.0,
            ..BoxLossConfig::default()
        },
        &mut parts,
    )
    .unwrap();
    let total = parts.total().unwrap().to_scalar::<f32>().unwrap();
    let giou = parts.values().unwrap()[1].1;
    assert!((total - 2.0 * giou).abs() < 1e-6);
    let mut none = LossParts::new();
    box_losses(
        &pred,
        &tgt,
        &BoxLossConfig {
            l1: 0.0,
            giou: 0.0,
            ..BoxLossConfig::default()
        },
        &mut none,
    )
    .unwrap();
    assert!(none.total().is_err());
}

/// The distillation losses against torch (`gen_fixtures.py`, section `distill`): values
/// and the gradient with respect to the student input. Tolerance 1e-5 (values), 1e-5
/// (gradients); the max error seen is printed.
#[test]
fn distillation_losses_match_torch() {
    use gk_train::distill::{feature_loss, info_nce, region_info_nce, similarity_kl, FeatureLoss};
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/distill/golden.safetensors");
    let g = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let temp = f64::from(g["temp"].to_scalar::<f32>().unwrap());
    let tau = f64::from(g["tau"].to_scalar::<f32>().unwrap());
    type LossFn<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let cases: Vec<(&str, &str, LossFn)> = vec![
        (
            "info_nce",
            "a",
            Box::new(|x| info_nce(x, &g["b"], &g["scale"]).unwrap()),
        ),
        (
            "sim_kl",
            "student_sim",
            Box::new(|x| similarity_kl(x, &g["teacher_sim"], temp).unwrap()),
        ),
        (
            "cos",
            "a",
            Box::new(|x| feature_loss(x, &g["feat_t"], FeatureLoss::Cosine).unwrap()),
        ),
        (
            "mse",
            "a",
            Box::new(|x| feature_loss(x, &g["feat_t"], FeatureLoss::Mse).unwrap()),
        ),
        (
            "region",
            "anchor",
            Box::new(|x| region_info_nce(x, &g["cands"], &g["pos"], None, tau).unwrap()),
        ),
    ];
    let mut worst = (0f32, 0f32);
    for (name, input, f) in cases {
        let x = Var::from_tensor(&g[input]).unwrap();
        let loss = f(x.as_tensor());
        let want = g[&format!("{name}_loss")].to_scalar::<f32>().unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        let grad = loss.backward().unwrap().get(&x).unwrap().clone();
        let eg = (grad - &g[&format!("{name}_grad")])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let e = (got - want).abs();
        println!("{name}: {got} vs {want} (|diff| {e:.1e}), grad max |diff| {eg:.1e}");
        assert!(
            e <= 1e-5 * want.abs().max(1.0) && eg <= 1e-5,
            "{name}: value {e}, grad {eg}"
        );
        worst = (worst.0.max(e), worst.1.max(eg));
    }
    println!(
        "distillation losses max abs error: value {:.1e}, gradient {:.1e}",
        worst.0, worst.1
    );
}

/// HiVG's focal and dice losses against DETR's functions in torch (`gen_fixtures.py`, section
/// `hivg`): values and gradients with respect to the logits. Tolerance 1e-5.
#[test]
fn focal_and_dice_match_detr() {
    use gk_train::losses::{dice, sigmoid_focal};
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hivg/golden.safetensors");
    let g = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    type LossFn<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let cases: Vec<(&str, LossFn)> = vec![
        (
            "focal",
            Box::new(|x| sigmoid_focal(x, &g["t"], 0.25, 2.0).unwrap()),
        ),
        ("dice", Box::new(|x| dice(x, &g["t"]).unwrap())),
    ];
    for (name, f) in cases {
        let x = Var::from_tensor(&g["x"]).unwrap();
        let loss = f(x.as_tensor());
        let got = loss.to_scalar::<f32>().unwrap();
        let want = g[&format!("{name}_loss")].to_scalar::<f32>().unwrap();
        let grad = loss.backward().unwrap().get(&x).unwrap().clone();
        let eg = (grad - &g[&format!("{name}_grad")])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("{name}: {got} vs {want}, grad max |diff| {eg:.2e}");
        assert!((got - want).abs() < 1e-5 && eg < 1e-5, "{name}");
    }
}

/// CKD's scores and losses against torch (`gen_fixtures.py`, section `ckd`): the
/// image-sentence scores, NCE with same-image pairs removed, the distillation over the K
/// regions nearest the student's top region, the ramped total, and the gradients with
/// respect to the phrase and region embeddings. Tolerance 1e-5.
#[test]
fn ckd_scores_and_losses_match_torch() {
    use gk_train::ckd::{
        distill_loss, distill_targets, image_sentence_scores, nce_loss, ramp, region_phrase_scores,
        DistillTarget, TeacherNorm,
    };
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/ckd/golden.safetensors");
    let g = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let f = |k: &str| f64::from(g[k].to_scalar::<f32>().unwrap());
    let (scale, student_scale, k) = (f("scale"), f("student_scale"), f("k") as usize);
    let ph = Var::from_tensor(&g["phrases"]).unwrap();
    let rg = Var::from_tensor(&g["regions"]).unwrap();
    let s = region_phrase_scores(ph.as_tensor(), rg.as_tensor()).unwrap();
    let big_s = image_sentence_scores(&s, &g["region_valid"], &g["phrase_valid"], scale).unwrap();
    let nce = nce_loss(&big_s, Some(&g["exclude"])).unwrap();
    // distillation targets from the CPU copies, as the trainer builds them
    let boxes = g["boxes"].to_vec3::<f32>().unwrap();
    let post = g["posteriors"].to_vec3::<f32>().unwrap();
    let classes = g["classes"].to_vec2::<f32>().unwrap();
    let rv = g["region_valid"].to_vec2::<f32>().unwrap();
    let pv = g["phrase_valid"].to_vec2::<f32>().unwrap();
    let mut targets = Vec::new();
    for i in 0..boxes.len() {
        let n = rv[i].iter().filter(|v| **v > 0.0).count();
        let own = s.i((i, .., i)).unwrap().to_vec2::<f32>().unwrap();
        for j in 0..classes[i].len() {
            if pv[i][j] == 0.0 || classes[i][j] < 0.0 {
                continue;
            }
            let bx: Vec<[f32; 4]> = boxes[i][..n]
                .iter()
                .map(|b| [b[0], b[1], b[2], b[3]])
                .collect();
            let (regions, q) = distill_targets(
                &own[j][..n],
                &bx,
                &post[i],
                classes[i][j] as usize,
                k,
                TeacherNorm::SubtractMean,
            );
            targets.push(DistillTarget {
                sample: i,
                phrase: j,
                regions,
                q,
            });
        }
    }
    let distill = distill_loss(&s, &targets, student_scale).unwrap();
    let total = (&nce + (&distill * ramp(1234, 500, 3.0)).unwrap()).unwrap();
    let grads = total.backward().unwrap();
    let diff = |a: &Tensor, b: &Tensor| {
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
    };
    let errs = [
        ("S", diff(&big_s, &g["S"])),
        ("nce", diff(&nce, &g["nce"])),
        ("distill", diff(&distill, &g["distill"])),
        ("total", diff(&total, &g["total"])),
        (
            "grad phrases",
            diff(grads.get(&ph).unwrap(), &g["grad_phrases"]),
        ),
        (
            "grad regions",
            diff(grads.get(&rg).unwrap(), &g["grad_regions"]),
        ),
    ];
    println!("ckd max abs error: {errs:?}");
    for (name, e) in errs {
        assert!(e <= 1e-5, "{name}: {e}");
    }
}
