//! The training pipeline end to end on the tiny benchmark: the loss falls, an interrupted
//! and resumed run ends with exactly the weights of an uninterrupted one (dropout included),
//! and evaluation and prediction read what training wrote.

mod common;

use candle_core::Device;
use common::train_losses;
use gk_data::synth::{generate, SynthConfig};
use gk_models::convnet::ConvNetConfig;
use gk_models::grounder::GrounderConfig;
use gk_train::run::RunDir;
use gk_train::train::{self, RunConfig, TrainOptions};
use std::path::Path;

fn tiny_config(data: &Path) -> RunConfig {
    let mut cfg = RunConfig::synth(data, 2);
    let mut model = GrounderConfig::tiny();
    model.image_size = 64;
    // the demo's architecture (conv backbone, dense head) at test size
    model.visual = gk_models::grounder::VisualConfig::ConvNet(ConvNetConfig {
        image_size: 64,
        ..ConvNetConfig::tiny()
    });
    model.head = gk_models::grounder::BoxHead::Dense;
    model.word_head = true;
    if let gk_models::grounder::TextConfig::Bert(b) = &mut model.text {
        b.max_position_embeddings = 20;
    }
    model.max_text_len = 20;
    cfg.model = model;
    cfg.optim.batch_size = 8;
    cfg.optim.warmup_steps = 2;
    cfg.optim.eval_every = 3;
    cfg.optim.augment.side = 64;
    cfg.optim.lr = 1e-3;
    cfg
}

fn weights(run: &RunDir) -> Vec<(String, Vec<f32>)> {
    let t =
        gk_train::weights::read_safetensors(&run.file("model.safetensors"), &Device::Cpu).unwrap();
    let mut v: Vec<_> = t
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn train_resume_eval_predict() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let mut cfg = tiny_config(&data);
    // seeded dropout: the resumed steps must draw the uninterrupted run's masks
    cfg.model.fusion.dropout = 0.1;

    // uninterrupted
    let a = train::prepare(&dir.path().join("a"), cfg.clone()).unwrap();
    let (state_a, report) = train::train(&a, &TrainOptions::default()).unwrap();
    assert!(
        state_a.finished && state_a.step == state_a.total_steps && state_a.step >= 6,
        "{state_a:?}"
    );
    assert!(report.all.n > 0);

    // interrupted after 4 steps (not an eval step), then resumed
    let b = train::prepare(&dir.path().join("b"), cfg.clone()).unwrap();
    let (state_b, _) = train::train(
        &b,
        &TrainOptions {
            stop_after: Some(4),
            progress: false,
        },
    )
    .unwrap();
    assert_eq!(state_b.step, 4);
    assert!(!state_b.finished);
    let (state_b, _) =
        train::train(&RunDir::open(b.path()).unwrap(), &TrainOptions::default()).unwrap();
    assert_eq!(state_b.step, state_a.step);
    assert_eq!(
        weights(&a),
        weights(&b),
        "resumed run differs from the uninterrupted one"
    );

    // the loss went down over training (metrics.jsonl has a train line every 10 steps or at the end)
    let losses = train_losses(&a);
    assert!(!losses.is_empty());

    // prediction reads the run through the one inference interface
    let p = gk_train::infer::open(&a).unwrap();
    let img = image::RgbImage::new(100, 60);
    let q = |expr| gk_train::infer::Query { image: &img, expr };
    let g = p.ground(&[q("the red circle")]).unwrap().remove(0);
    assert!(g.bbox_xyxy[2] <= 100.0 && g.bbox_xyxy[3] <= 60.0 && g.bbox_xyxy[0] >= 0.0);
    assert!(p.ground(&[q("   ")]).is_err());
    // a batch answers each query as it is answered alone
    let both = p
        .ground(&[q("the red circle"), q("the blue square on the left")])
        .unwrap();
    let d = (0..4)
        .map(|k| (both[0].bbox_xyxy[k] - g.bbox_xyxy[k]).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-3, "batched answer moved by {d} px");

    // evaluation through the interface scores as the trainer's loader-based evaluation
    let loaded = train::load_inference(&a, "best.safetensors", &Device::Cpu).unwrap();
    let val = train::load_set(&loaded.cfg, &loaded.cfg.data.val).unwrap();
    let by_loader = gk_train::eval::evaluate(
        &loaded.model,
        &train::eval_loader(&loaded.cfg, val.clone(), &loaded.tok),
        gk_train::eval::GtBoxes::Stored,
        |_| {},
    )
    .unwrap();
    let by_interface =
        gk_train::infer::evaluate(p.as_ref(), &val, gk_train::eval::GtBoxes::Stored, 5, |_| {})
            .unwrap();
    assert_eq!(by_interface.all.n, by_loader.all.n);
    assert_eq!(by_interface.all.hits50, by_loader.all.hits50);
    assert!((by_interface.all.miou() - by_loader.all.miou()).abs() < 1e-3);
}

#[test]
fn loss_falls_on_a_fixed_batch() {
    // llm.c-style: a few steps on fixed data must reduce the loss clearly.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let mut cfg = tiny_config(&data);
    cfg.optim.epochs = 12; // 60 steps: the dense head's cell loss needs a few more than a regressed box
    cfg.optim.augment = gk_data::transforms::TransformConfig::eval(64);
    cfg.optim.eval_every = 1000;
    let run = train::prepare(&dir.path().join("r"), cfg).unwrap();
    train::train(&run, &TrainOptions::default()).unwrap();
    let train = train_losses(&run);
    assert!(train.len() >= 2, "{train:?}");
    assert!(
        train.last().unwrap() < &(train[0] * 0.8),
        "loss did not fall: {train:?}"
    );
}

#[test]
fn non_finite_loss_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let mut cfg = tiny_config(&data);
    cfg.optim.lr = 1e30; // blows up after the first step
    cfg.optim.warmup_steps = 0;
    cfg.optim.clip_grad = 0.0;
    let run = train::prepare(&dir.path().join("r"), cfg).unwrap();
    let e = train::train(&run, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-finite loss"), "{e}");
}

#[test]
fn committed_configs_parse() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        if gk_train::ckd::is_ckd_config(&text) {
            let cfg: gk_train::ckd::CkdRunConfig =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let mut want = gk_train::ckd::CkdRunConfig::synth(Path::new("demo-run/data"), 4);
            want.ckd.detector = Some("demo-run/detector".into());
            assert_eq!(cfg, want, "{} is CkdRunConfig::synth()", p.display());
            continue;
        }
        let cfg: RunConfig =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(cfg.optim.epochs > 0, "{}", p.display());
        if p.ends_with("hivg-b16-refcoco.toml") {
            assert_eq!(
                cfg.hilora,
                Some(gk_train::hilora::HiLoraConfig::hivg_b16()),
                "the paper's stages"
            );
            assert_eq!(
                cfg.model.visual,
                gk_models::grounder::VisualConfig::Hivg(gk_models::hivg::HivgConfig::clip_b16())
            );
        }
        if p.ends_with("hivg-synth.toml") {
            let mut want = GrounderConfig::hivg_synth();
            want.head = cfg.model.head;
            assert_eq!(cfg.model.visual, want.visual);
            assert_eq!(cfg.model.text, want.text);
            assert_eq!(cfg.model.image_size, want.image_size);
            assert_eq!(cfg.optim.augment.side as usize, want.image_size);
        }
        if p.ends_with("qrnet-synth.toml") {
            assert_eq!(cfg.model.visual, GrounderConfig::qrnet_synth().visual);
        }
    }
}

/// A teacher pretrained on the tiny benchmark: the folder loads as a CLIP teacher, its
/// embeddings are unit vectors, its retrieval scores are percentages, and the InfoNCE loss
/// falls during pretraining.
#[test]
fn teacher_pretrains_loads_and_embeds() {
    use gk_train::teacher::{pretrain, PretrainConfig, Teacher};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let cfg = PretrainConfig {
        image_size: 32,
        max_text_len: 24,
        hidden: 32,
        vision_layers: 1,
        text_layers: 1,
        projection_dim: 16,
        epochs: 4,
        batch_size: 16,
        warmup_steps: 2,
        lr: 2e-3,
        ..PretrainConfig::synth()
    };
    let mut losses = Vec::new();
    let out = dir.path().join("teacher");
    let report = pretrain(&data, &out, &cfg, &Device::Cpu, |_, _, l| losses.push(l)).unwrap();
    let (first, last) = (
        losses[..3].iter().sum::<f32>() / 3.0,
        losses[losses.len() - 3..].iter().sum::<f32>() / 3.0,
    );
    assert!(last < first, "InfoNCE did not fall: {first} -> {last}");
    for r in [&report.scenes, &report.objects] {
        assert!(
            r.n > 0
                && (0.0..=100.0).contains(&r.image_to_text_r5)
                && r.image_to_text_r1 <= r.image_to_text_r5
        );
    }
    let t = Teacher::open(&out, &Device::Cpu).unwrap();
    assert_eq!(t.id.len(), 64);
    let e = t
        .text_embeds(&["the red circle", "a small blue star"])
        .unwrap();
    let norms = e.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
    let img = gk_data::image_io::load_rgb(
        &data
            .join("images/val")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    let r = t
        .region_embeds(&img, &[[2.0, 2.0, 12.0, 14.0], [20.0, 5.0, 30.0, 30.0]])
        .unwrap();
    assert_eq!(r.dims(), &[2, 16]);
    // A tokenizer from another model is refused by name.
    let cfg_path = out.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    c["text_config"]["vocab_size"] = 5.into();
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    let e = Teacher::open(&out, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("tokenizer"), "{e}");
}

/// EpmVG and DUET's teacher term on the tiny benchmark: a run with a `[distill]` section trains with the
/// `kd_*` losses from a cached teacher, resumes (the projections are in the checkpoint),
/// reuses the cache, rebuilds it when the teacher changes, and refuses a teacher whose
/// embedding size differs from the one the run was prepared for.
#[test]
fn distillation_trains_from_a_cached_and_a_live_teacher() {
    use gk_train::distill::DistillConfig;
    use gk_train::teacher::{pretrain, PretrainConfig};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let tcfg = PretrainConfig {
        image_size: 32,
        max_text_len: 24,
        hidden: 32,
        vision_layers: 1,
        text_layers: 1,
        projection_dim: 16,
        epochs: 1,
        batch_size: 16,
        ..PretrainConfig::synth()
    };
    let teacher = dir.path().join("teacher");
    pretrain(&data, &teacher, &tcfg, &Device::Cpu, |_, _, _| {}).unwrap();
    let mut cfg = tiny_config(&data);
    cfg.optim.epochs = 1;
    cfg.distill = Some(DistillConfig {
        teacher: teacher.clone(),
        teacher_dim: 0,
        feature: 1.0,
        feature_kind: Default::default(),
        cross: 1.0,
        temperature: 2.0,
        duet_region: 1.0,
        duet_align: 1.0,
        duet_self: 1.0,
        sla: Default::default(),
        live: false,
    });
    let run = train::prepare(&dir.path().join("run"), cfg.clone()).unwrap();
    let prepared: gk_train::train::RunConfig = run.load_config().unwrap();
    assert_eq!(prepared.distill.as_ref().unwrap().teacher_dim, 16);
    let opts = TrainOptions {
        stop_after: Some(2),
        ..TrainOptions::default()
    };
    train::train(&run, &opts).unwrap();
    assert!(
        teacher.join("cache").read_dir().unwrap().count() == 2,
        "cache tensors + meta"
    );
    // resume to the end: strict loads of the checkpoint include distill.*
    train::train(&run, &TrainOptions::default()).unwrap();
    let metrics = std::fs::read_to_string(run.file("metrics.jsonl")).unwrap();
    for kd in gk_train::distill::TERMS {
        assert!(metrics.contains(&format!("\"{kd}\"")), "{kd} not logged");
    }
    // the live teacher (embeddings of the augmented batch, no cache) trains the same terms
    let mut live = cfg.clone();
    live.distill.as_mut().unwrap().live = true;
    let run_live = train::prepare(&dir.path().join("run_live"), live).unwrap();
    train::train(&run_live, &TrainOptions::default()).unwrap();
    let metrics = std::fs::read_to_string(run_live.file("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"kd_self\"") && metrics.contains("\"kd_region\""));
    // evaluation and prediction load the distilled run
    gk_train::train::load_run(&run, Some("best.safetensors"), &Device::Cpu).unwrap();
    // a changed teacher: its cache is rebuilt (the run itself refuses a new embedding size)
    let w = teacher.join("model.safetensors");
    let mut t = gk_train::weights::read_safetensors(&w, &Device::Cpu).unwrap();
    let s = t["logit_scale"].affine(1.0, 0.5).unwrap();
    t.insert("logit_scale".into(), s);
    candle_core::safetensors::save(&t, &w).unwrap();
    let t2 = gk_train::teacher::Teacher::open(&teacher, &Device::Cpu).unwrap();
    let ds = gk_data::dataset::Dataset::load(&data.join("train.jsonl"), None, &Default::default())
        .unwrap();
    let (_, status) =
        gk_train::teacher::FeatureCache::load_or_build(&t2, &teacher, &ds, false, |_, _| {})
            .unwrap();
    assert!(
        matches!(status, gk_train::teacher::CacheStatus::Rebuilt(ref why) if why.contains("teacher")),
        "{status:?}"
    );
    let (_, status) =
        gk_train::teacher::FeatureCache::load_or_build(&t2, &teacher, &ds, false, |_, _| {})
            .unwrap();
    assert_eq!(status, gk_train::teacher::CacheStatus::Hit);
    // a cache without SLA scores is rebuilt when they are needed; one with them serves both
    let (_, status) =
        gk_train::teacher::FeatureCache::load_or_build(&t2, &teacher, &ds, true, |_, _| {})
            .unwrap();
    assert!(
        matches!(status, gk_train::teacher::CacheStatus::Rebuilt(ref why) if why.contains("SLA")),
        "{status:?}"
    );
    let (_, status) =
        gk_train::teacher::FeatureCache::load_or_build(&t2, &teacher, &ds, false, |_, _| {})
            .unwrap();
    assert_eq!(status, gk_train::teacher::CacheStatus::Hit);
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(teacher.join("config.json")).unwrap())
            .unwrap();
    c["projection_dim"] = 8.into();
    std::fs::write(teacher.join("config.json"), c.to_string()).unwrap();
    let run2 = train::prepare(&dir.path().join("run2"), cfg).unwrap();
    std::fs::write(
        teacher.join("config.json"),
        std::fs::read_to_string(teacher.join("config.json"))
            .unwrap()
            .replace("\"projection_dim\":8", "\"projection_dim\":16"),
    )
    .unwrap();
    let e = train::train(&run2, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("embeds in 16 dimensions, the run was prepared for 8"),
        "{e}"
    );
}

/// HiVG with HiLoRA at toy size: a warm-up and one LoRA stage run in sequence, the second
/// from the first's best checkpoint. CLIP's own weights and the warm-up set stay as they
/// were; the new set learns only in the layers its stage opens; a second call finds both
/// stages finished; `--stage 1` alone needs stage 0.
#[test]
fn hilora_stages_train_in_sequence() {
    use gk_models::clip::{ClipTextConfig, ClipVisionConfig};
    use gk_models::grounder::{TextConfig, VisualConfig};
    use gk_models::hivg::HivgConfig;
    use gk_train::hilora::{train_stages, HiLoraConfig, HiLoraStage};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthConfig::tiny(), &data, &mut |_, _| {}).unwrap();
    let mut cfg = tiny_config(&data);
    cfg.optim.epochs = 1;
    cfg.optim.eval_every = 0;
    cfg.model.head = gk_models::grounder::BoxHead::RegMlp;
    cfg.model.word_head = false; // (it reads the dense head's cells)
    cfg.loss.words = 0.0;
    cfg.model.text = TextConfig::ClipText(ClipTextConfig {
        max_position_embeddings: 20,
        ..ClipTextConfig::tiny()
    });
    cfg.model.visual = VisualConfig::Hivg(HivgConfig {
        vision: ClipVisionConfig {
            image_size: 64,
            ..ClipVisionConfig::tiny()
        },
        ..HivgConfig::tiny(32, 20)
    });
    let stage = |vision_layers| HiLoraStage {
        epochs: 1,
        lr: 1e-3,
        vision_layers,
    };
    cfg.hilora = Some(HiLoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.1,
        targets: vec!["q_proj".into(), "v_proj".into()],
        stages: vec![stage(0), stage(1)],
    });
    // HiVG's auxiliary losses (their weights in the paper)
    cfg.loss.token_focal = 20.0;
    cfg.loss.token_dice = 2.0;
    cfg.loss.mask_focal = 20.0;
    cfg.loss.mask_dice = 2.0;
    let out = dir.path().join("hivg");
    let e = train_stages(&out, &cfg, Some(1), &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("train stage 0 first"), "{e}");
    let done = train_stages(&out, &cfg, None, &TrainOptions::default()).unwrap();
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), vec![0, 1]);
    let read = |k: usize| {
        gk_train::weights::read_safetensors(
            &out.join(format!("stage{k}/best.safetensors")),
            &Device::Cpu,
        )
        .unwrap()
    };
    let (w0, w1) = (read(0), read(1));
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let abs = |a: &candle_core::Tensor| {
        a.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let base = "visual.encoder.layers.1.self_attn.q_proj.weight";
    assert_eq!(diff(&w0[base], &w1[base]), 0.0, "CLIP weights are frozen");
    let s0 = "visual.encoder.layers.0.self_attn.q_proj.lora_B.s0.weight";
    assert_eq!(abs(&w0[s0]), 0.0, "the warm-up set is frozen at zero");
    assert_eq!(abs(&w1[s0]), 0.0);
    assert!(!w0.contains_key("visual.encoder.layers.0.self_attn.q_proj.lora_B.s1.weight"));
    let s1 = |l: usize| format!("visual.encoder.layers.{l}.self_attn.q_proj.lora_B.s1.weight");
    assert!(abs(&w1[&s1(0)]) > 0.0, "stage 1 trains its set in layer 0");
    assert_eq!(abs(&w1[&s1(1)]), 0.0, "but not in layer 1");
    assert!(
        diff(
            &w0["visual.bridge.0.gate.weight"],
            &w1["visual.bridge.0.gate.weight"]
        ) > 0.0
    );
    let metrics = std::fs::read_to_string(out.join("stage1/metrics.jsonl")).unwrap();
    for part in ["token_focal", "token_dice", "mask_focal", "mask_dice"] {
        assert!(
            metrics.contains(&format!("\"{part}\"")),
            "{part} not logged"
        );
    }
    // a second call keeps both finished stages
    let again = train_stages(&out, &cfg, None, &TrainOptions::default()).unwrap();
    assert_eq!(again, done);
    // the merged model (what prediction uses) predicts what the unmerged one does
    let stage1 = RunDir::open(&out.join("stage1")).unwrap();
    let loaded = train::load_run(&stage1, Some("best.safetensors"), &Device::Cpu).unwrap();
    let merged = loaded.model.merge_lora().unwrap();
    let val = train::load_set(&loaded.cfg, &loaded.cfg.data.val).unwrap();
    let loader = train::eval_loader(&loaded.cfg, val, &loaded.tok);
    let batch = loader.epoch(0).next().unwrap().unwrap();
    let run = |m: &gk_models::grounder::Grounder| {
        m.forward(
            &batch.pixels,
            &batch.pixel_mask,
            &batch.ids,
            &batch.text_mask,
            gk_models::nn::Mode::Eval,
        )
        .unwrap()
        .pred_box
    };
    let d = diff(&run(&loaded.model), &run(&merged));
    assert!(d < 1e-4, "merged LoRA moved the boxes by {d}");
    let p = gk_train::infer::open(&stage1).unwrap();
    let img = image::RgbImage::from_pixel(64, 48, image::Rgb([90, 120, 200]));
    let q = gk_train::infer::Query {
        image: &img,
        expr: "the blue square",
    };
    assert_eq!(p.ground(&[q]).unwrap().len(), 1);
}

/// HiVG's contrastive term: CLIP's symmetric cross-entropy over `exp(logit_scale) · cos` of
/// the projected pooled outputs, checked against the formula in plain f32; asking for it
/// without a contrastive head is a config error.
#[test]
fn hivg_contrastive_term_is_clips_loss() {
    use candle_core::{DType, Tensor};
    use gk_models::clip::{ClipTextConfig, ClipVisionConfig};
    use gk_models::grounder::{Grounder, TextConfig, VisualConfig};
    use gk_models::hivg::HivgConfig;
    let dev = Device::Cpu;
    let mut cfg = RunConfig::synth(Path::new("unused"), 1);
    cfg.model = GrounderConfig::tiny();
    cfg.loss.words = 0.0; // no word head on this model
    cfg.model.text = TextConfig::ClipText(ClipTextConfig {
        max_position_embeddings: 20,
        ..ClipTextConfig::tiny()
    });
    cfg.model.max_text_len = 12;
    cfg.model.visual = VisualConfig::Hivg(HivgConfig {
        vision: ClipVisionConfig::tiny(),
        ..HivgConfig::tiny(cfg.model.text_dim(), 12)
    });
    cfg.loss.contrastive = 1.0;
    let map = candle_nn::VarMap::new();
    let g = Grounder::new(
        candle_nn::VarBuilder::from_varmap(&map, DType::F32, &dev),
        &cfg.model,
    )
    .unwrap();
    let (b, s, l) = (3, cfg.model.image_size, 12);
    let ids = Tensor::from_vec(
        (0..b * l).map(|i| (i % 40) as u32 + 1).collect(),
        (b, l),
        &dev,
    )
    .unwrap();
    let out = g
        .forward(
            &Tensor::randn(0f32, 1.0, (b, 3, s, s), &dev).unwrap(),
            &Tensor::ones((b, s, s), DType::F32, &dev).unwrap(),
            &ids,
            &Tensor::ones((b, l), DType::F32, &dev).unwrap(),
            gk_models::nn::Mode::Eval,
        )
        .unwrap();
    let target = Tensor::new(&[[0.5f32, 0.5, 0.2, 0.2]; 3], &dev).unwrap();
    let parts = train::criterion(&cfg, &out, &target, &ids).unwrap();
    let got = parts
        .values()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "contrastive")
        .expect("a contrastive part")
        .1;
    let c = out.clip.unwrap();
    let norm = |t: &Tensor| -> Vec<Vec<f32>> {
        t.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| {
                let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter().map(|x| x / n).collect()
            })
            .collect()
    };
    let (im, tx) = (norm(&c.image), norm(&c.text));
    let scale = 2.6592f32.exp();
    let logit =
        |i: usize, j: usize| scale * im[i].iter().zip(&tx[j]).map(|(a, b)| a * b).sum::<f32>();
    let ce = |f: &dyn Fn(usize, usize) -> f32| -> f32 {
        (0..b)
            .map(|i| {
                let z: f32 = (0..b).map(|j| f(i, j).exp()).sum();
                z.ln() - f(i, i)
            })
            .sum::<f32>()
            / b as f32
    };
    let want = (ce(&logit) + ce(&|i, j| logit(j, i))) / 2.0;
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    // no contrastive head: a clear error
    let mut plain = cfg.clone();
    plain.model = GrounderConfig::tiny();
    let map = candle_nn::VarMap::new();
    let g = Grounder::new(
        candle_nn::VarBuilder::from_varmap(&map, DType::F32, &dev),
        &plain.model,
    )
    .unwrap();
    let s = plain.model.image_size;
    let l = plain.model.max_text_len;
    let out = g
        .forward(
            &Tensor::randn(0f32, 1.0, (b, 3, s, s), &dev).unwrap(),
            &Tensor::ones((b, s, s), DType::F32, &dev).unwrap(),
            &Tensor::ones((b, l), DType::U32, &dev).unwrap(),
            &Tensor::ones((b, l), DType::F32, &dev).unwrap(),
            gk_models::nn::Mode::Eval,
        )
        .unwrap();
    let e = train::criterion(&plain, &out, &target, &ids)
        .unwrap_err()
        .to_string();
    assert!(e.contains("contrastive_dim"), "{e}");
}
