//! Box ops against torchvision.ops (`box_iou`, `generalized_box_iou`) on 16 random pairs.
//! Fixture: `tools/reference/gen_fixtures.py` -> `tests/fixtures/box/golden.safetensors`.
//! Tolerance 1e-5 (f32).

use candle_core::{Device, Tensor};
use gk_box::{cxcywh_to_xyxy_t, giou, iou, iou_giou_t, pairwise_iou_t};

fn golden() -> std::collections::HashMap<String, Tensor> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/box/golden.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn max_err(a: &Tensor, b: &Tensor) -> f32 {
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

#[test]
fn tensor_ops_match_torchvision() {
    let g = golden();
    let p = cxcywh_to_xyxy_t(&g["pred_cxcywh"]).unwrap();
    let t = cxcywh_to_xyxy_t(&g["tgt_cxcywh"]).unwrap();
    assert!(max_err(&p, &g["pred_xyxy"]) < 1e-6);
    let (i, gi) = iou_giou_t(&p, &t).unwrap();
    let e_iou = max_err(&i, &g["iou"]);
    let diag: Vec<f32> = g["giou_matrix"]
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(k, r)| r[k])
        .collect();
    let e_giou = max_err(&gi, &Tensor::new(diag.as_slice(), &Device::Cpu).unwrap());
    let e_mat = max_err(&pairwise_iou_t(&p, &t).unwrap(), &g["iou_matrix"]);
    println!("iou {e_iou:.2e} giou {e_giou:.2e} iou matrix {e_mat:.2e}");
    assert!(e_iou < 1e-5 && e_giou < 1e-5 && e_mat < 1e-5);
}

#[test]
fn scalar_ops_match_torchvision() {
    let g = golden();
    let p = g["pred_xyxy"].to_vec2::<f32>().unwrap();
    let t = g["tgt_xyxy"].to_vec2::<f32>().unwrap();
    let im = g["iou_matrix"].to_vec2::<f32>().unwrap();
    let gm = g["giou_matrix"].to_vec2::<f32>().unwrap();
    let b = |v: &Vec<f32>| [v[0], v[1], v[2], v[3]];
    for i in 0..p.len() {
        for j in 0..t.len() {
            assert!(
                (iou(b(&p[i]), b(&t[j])).unwrap() - im[i][j]).abs() < 1e-5,
                "iou {i},{j}"
            );
            assert!(
                (giou(b(&p[i]), b(&t[j])).unwrap() - gm[i][j]).abs() < 1e-5,
                "giou {i},{j}"
            );
        }
    }
}

#[test]
fn degenerate_tensor_boxes_are_rejected() {
    let dev = Device::Cpu;
    let ok = Tensor::new(&[[0f32, 0.0, 1.0, 1.0]], &dev).unwrap();
    let bad = Tensor::new(&[[0.5f32, 0.0, 0.2, 1.0]], &dev).unwrap();
    assert!(matches!(
        iou_giou_t(&ok, &bad),
        Err(gk_box::BoxError::Degenerate(_))
    ));
    let nan = Tensor::new(&[[0f32, f32::NAN, 1.0, 1.0]], &dev).unwrap();
    assert!(iou_giou_t(&nan, &ok).is_err());
    let wrong = Tensor::new(&[0f32, 0.0, 1.0], &dev).unwrap();
    assert!(matches!(
        cxcywh_to_xyxy_t(&wrong),
        Err(gk_box::BoxError::Shape(_))
    ));
}
