//! CKD end to end on the tiny benchmark: a detector trains on object labels; the weakly
//! supervised student trains from image-expression pairs with NCE + distillation, every
//! parameter gets a gradient, an interrupted run resumes exactly, evaluation reports
//! consistent recalls, and prediction works with the detector gone.

use candle_core::Device;
use gk_data::proposals::ProposalConfig;
use gk_data::synth::{generate, SynthConfig};
use gk_models::ckd::CkdModelConfig;
use gk_models::convnet::ConvNetConfig;
use gk_models::grounder::VisualConfig;
use gk_train::ckd::{self, CkdRunConfig};
use gk_train::detector::{train_detector, DetectorMeta, DetectorTrainConfig, TrainedDetector};
use gk_train::run::RunDir;
use gk_train::train::TrainOptions;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn proposals() -> ProposalConfig {
    ProposalConfig {
        max: 12,
        ..ProposalConfig::default()
    }
}

fn tiny_config(data: &Path, detector: &Path) -> CkdRunConfig {
    let mut cfg = CkdRunConfig::synth(data, 2);
    cfg.model = CkdModelConfig {
        visual: VisualConfig::ConvNet(ConvNetConfig {
            image_size: 64,
            ..ConvNetConfig::tiny()
        }),
        image_size: 64,
        ..CkdModelConfig::tiny()
    };
    if let gk_models::grounder::TextConfig::Bert(b) = &mut cfg.model.text {
        b.max_position_embeddings = 20;
    }
    cfg.optim.batch_size = 8;
    cfg.optim.warmup_steps = 2;
    cfg.optim.eval_every = 3;
    cfg.optim.augment.side = 64;
    cfg.ckd.detector = Some(detector.to_path_buf());
    cfg.ckd.proposals = proposals();
    cfg.ckd.distill_k = 4;
    cfg.ckd.ramp_every = 1;
    cfg
}

fn weights(run: &RunDir, name: &str) -> Vec<(String, Vec<f32>)> {
    let t = gk_train::weights::read_safetensors(&run.file(name), &Device::Cpu).unwrap();
    let mut v: Vec<_> = t
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The tiny benchmark in `dir/data` and a detector trained on it in `dir/detector`;
/// `on_loss` sees every detector step's loss.
fn data_and_detector(
    dir: &Path,
    epochs: usize,
    on_loss: impl FnMut(usize, usize, f32),
) -> (PathBuf, PathBuf, DetectorMeta) {
    let data = dir.join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let det = dir.join("detector");
    let dcfg = DetectorTrainConfig {
        epochs,
        batch_size: 16,
        proposals: proposals(),
        ..DetectorTrainConfig::default()
    };
    let meta = train_detector(&data, &det, &dcfg, on_loss).unwrap();
    (data, det, meta)
}

/// A fresh run of `cfg` and the first batch of its training set (eval order) in CKD's form.
struct FirstBatch {
    loaded: ckd::LoadedCkd,
    loader: gk_data::batch::Loader,
    batch: gk_data::batch::Batch,
    cb: ckd::CkdBatch,
    props: ckd::Proposals,
    classes: gk_data::phrases::ClassMap,
}

impl FirstBatch {
    fn new(dir: &Path, cfg: &CkdRunConfig) -> Self {
        use gk_data::phrases::{ClassMap, Labels};
        let run = ckd::prepare(&dir.join("r"), cfg.clone()).unwrap();
        let loaded = ckd::load_run(&run, None, &Device::Cpu).unwrap();
        let ds = gk_train::train::load_set_with(&cfg.data, &cfg.data.train).unwrap();
        let props = ckd::Proposals::load_or_build(&run, &cfg.ckd.proposals, &[&ds], false).unwrap();
        let loader = ckd::eval_loader(cfg, ds, &loaded.tok);
        let batch = loader.epoch(0).next().unwrap().unwrap();
        let cb = ckd::ckd_batch(
            &batch,
            loader.dataset(),
            &props,
            &loaded.tok,
            &cfg.model,
            16,
        )
        .unwrap();
        let classes = ClassMap::new(&Labels::load(&cfg.ckd.labels).unwrap());
        Self {
            loaded,
            loader,
            batch,
            cb,
            props,
            classes,
        }
    }

    fn images(&self) -> Vec<&str> {
        let ds = self.loader.dataset();
        self.batch
            .indices
            .iter()
            .map(|&i| ds.records[i].image.as_str())
            .collect()
    }
}

#[test]
fn ckd_trains_resumes_evaluates_and_predicts_without_the_detector() {
    let dir = tempfile::tempdir().unwrap();
    // the detector: object classes + background on proposals
    let mut losses = Vec::new();
    let (data, det, meta) = data_and_detector(dir.path(), 2, |_, _, l| losses.push(l));
    assert_eq!(meta.model.classes, 5);
    assert!(losses.iter().all(|l| l.is_finite()) && losses.len() >= 4);
    assert!((0.0..=100.0).contains(&meta.val_accuracy));
    let trained = TrainedDetector::open(&det, &Device::Cpu).unwrap();
    let img = gk_data::image_io::load_rgb(&data.join("images/val/000000.png")).unwrap();
    let post = trained
        .posteriors(&img, &[[0.0, 0.0, 30.0, 30.0], [10.0, 10.0, 50.0, 40.0]])
        .unwrap();
    assert_eq!(post.len(), 2);
    for p in &post {
        assert_eq!(p.len(), 6);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }

    let cfg = tiny_config(&data, &det);
    // uninterrupted
    let a = ckd::prepare(&dir.path().join("a"), cfg.clone()).unwrap();
    let (state_a, report) = ckd::train(&a, &TrainOptions::default()).unwrap();
    assert!(state_a.finished && state_a.step == state_a.total_steps && state_a.step >= 6);
    let p = &report.phrases;
    assert!(p.n >= 10, "val phrases: {}", p.n);
    assert!(p.hits[0] <= p.hits[1] && p.hits[1] <= p.hits[2] && p.hits[2] <= p.reachable);
    assert!(p.reachable > 0, "no phrase reachable by the proposals");
    assert_eq!(report.expressions.all.n, 10);
    let metrics = std::fs::read_to_string(a.file("metrics.jsonl")).unwrap();
    let last: serde_json::Value = metrics
        .lines()
        .rfind(|l| l.contains("\"train\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    for part in ["nce", "distill"] {
        let v = last[part].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v >= 0.0, "{part} = {v} in {last}");
    }

    // interrupted after 2 steps, then resumed: the same weights
    let b = ckd::prepare(&dir.path().join("b"), cfg.clone()).unwrap();
    let (s, _) = ckd::train(
        &b,
        &TrainOptions {
            stop_after: Some(2),
            progress: false,
        },
    )
    .unwrap();
    assert_eq!(s.step, 2);
    assert!(!s.finished);
    ckd::train(&b, &TrainOptions::default()).unwrap();
    assert_eq!(
        weights(&a, "model.safetensors"),
        weights(&b, "model.safetensors")
    );

    // the student checkpoint holds no detector tensor, and prediction never needs one
    for (k, _) in weights(&a, "best.safetensors") {
        assert!(
            k.starts_with("visual.") || k.starts_with("text.") || k.starts_with("ckd."),
            "{k}"
        );
    }
    std::fs::rename(&det, dir.path().join("gone")).unwrap();
    let eval = ckd::eval_run(
        &a,
        "best.safetensors",
        std::slice::from_ref(&cfg.data.val),
        false,
    )
    .unwrap();
    assert_eq!(eval[0].expressions.all.n, 10);
    let predictor = ckd::CkdPredictor::open(&a).unwrap();
    let g = predictor.predict(&img, "the red circle").unwrap();
    assert!(g.bbox_xyxy[2] <= 64.0 && g.bbox_xyxy[0] >= 0.0 && g.score.is_finite());
    assert_eq!(g.phrase, "the red circle");
    assert!(predictor.predict(&img, "   ").is_err());
}

/// Every trainable parameter of the student gets a finite, non-zero gradient from
/// NCE + distillation on one batch.
#[test]
fn every_student_parameter_gets_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let (data, det, _) = data_and_detector(dir.path(), 1, |_, _, _| {});
    let cfg = tiny_config(&data, &det);
    let f = FirstBatch::new(dir.path(), &cfg);
    let s = ckd::forward(&f.loaded.model, &f.batch, &f.cb).unwrap();
    let detector = TrainedDetector::open(&det, &Device::Cpu).unwrap();
    let mut post = HashMap::new();
    for im in f.images() {
        let img = gk_data::image_io::load_rgb(&data.join(im)).unwrap();
        post.insert(
            im.to_string(),
            detector.posteriors(&img, &f.props.images[im]).unwrap(),
        );
    }
    let parts =
        ckd::criterion(&cfg.ckd, &s, &f.cb, &f.images(), &f.classes, Some(&post), 5).unwrap();
    let values = parts.values().unwrap();
    assert!(
        values.iter().any(|(n, v)| n == "distill" && *v > 0.0),
        "{values:?}"
    );
    let grads = parts.total().unwrap().backward().unwrap();
    let data = f.loaded.map.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut missing = Vec::new();
    for n in names {
        // BERT's pooler and token types are not on the phrase path (max-pool of the tokens)
        if n.contains("pooler") {
            continue;
        }
        match grads.get(data[n].as_tensor()) {
            Some(g) => {
                let a = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                if !(a.is_finite() && a > 0.0) {
                    missing.push(format!("{n} (|g| = {a})"));
                }
            }
            None => missing.push(format!("{n} (no gradient)")),
        }
    }
    assert!(missing.is_empty(), "{missing:?}");
}

/// NCE alone drives the loss down on one fixed batch (the student can separate images).
#[test]
fn nce_falls_on_a_fixed_batch() {
    use gk_train::optim::AdamW;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let mut cfg = tiny_config(&data, Path::new("unused"));
    cfg.ckd.detector = None;
    let f = FirstBatch::new(dir.path(), &cfg);
    let images = f.images();
    let mut opt = AdamW::new(&f.loaded.map, &[], 0.0).unwrap();
    let mut losses = Vec::new();
    for step in 0..40 {
        let s = ckd::forward(&f.loaded.model, &f.batch, &f.cb).unwrap();
        let parts = ckd::criterion(&cfg.ckd, &s, &f.cb, &images, &f.classes, None, step).unwrap();
        let loss = parts.total().unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.step(&loss.backward().unwrap(), 1e-3).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.5 * first, "NCE {first} -> {last}: {losses:?}");
}
