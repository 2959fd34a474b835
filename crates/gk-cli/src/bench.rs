//! `groundkit bench`: forward-pass and training-step timings on random weights, one JSON
//! line per case. `tools/reference/bench_compare.sh` runs this and the PyTorch twins
//! (`bench_torch.py`, `synth_twin.py`) side by side.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gk_models::clip::{ClipVisionConfig, ClipVisionTransformer};
use gk_models::grounder::{Grounder, GrounderConfig};
use gk_models::nn::Mode;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Timed iterations per case (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Which models: clip-b16-vision, grounder-clip-b16 (forward); grounder-hivg-b16 and
    /// grounder-qrnet-swin-s (forward at the papers' sizes: 224 and 640 px); grounder-transvg-r50
    /// (TransVG-R50 as published, 640 px, 20 tokens); grounder-hivg-b16-release and
    /// grounder-clipvg-b16 (HiVG-B/16 and CLIP-VG as `import` makes them); synth-small (the demo
    /// grounder's forward) and synth-small-train (one training step of it: forward, loss,
    /// backward, clipping, AdamW); qrnet-synth[-train], hivg-synth[-train] the same for
    /// QRNet-tiny and HiVG-tiny (the benchmark presets).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "clip-b16-vision,grounder-clip-b16"
    )]
    models: Vec<String>,
}

fn median_ms(iters: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// One benchmark case: builds its inputs for a batch size, returns the timed forward.
type Case = Box<dyn Fn(usize) -> Result<Box<dyn Fn() -> Result<()>>>>;

/// A model for the timed forwards: seeded random weights, detached (no autograd graph, as
/// the PyTorch side's `inference_mode`).
fn inference<M>(build: impl Fn(VarBuilder) -> candle_core::Result<M>) -> Result<M> {
    let (map, dev) = (VarMap::new(), Device::Cpu);
    build(gk_train::init::seeded_var_builder(&map, 0, &dev))?;
    Ok(build(gk_train::init::detached_var_builder(&map, &dev))?)
}

fn case(name: &str) -> Result<Case> {
    let dev = Device::Cpu;
    Ok(match name {
        "clip-b16-vision" => {
            let vit = std::rc::Rc::new(inference(|vb| {
                ClipVisionTransformer::new(vb, &ClipVisionConfig::vit_base_patch16())
            })?);
            Box::new(move |b| {
                let x = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &dev)?;
                let vit = vit.clone();
                Ok(Box::new(move || {
                    vit.forward(&x).map(|_| ()).map_err(Into::into)
                }))
            })
        }
        "grounder-clip-b16"
        | "grounder-hivg-b16"
        | "grounder-hivg-b16-release"
        | "grounder-clipvg-b16"
        | "grounder-qrnet-swin-s"
        | "grounder-transvg-r50" => {
            let cfg = match name {
                "grounder-hivg-b16" => GrounderConfig::hivg_b16(),
                "grounder-hivg-b16-release" => GrounderConfig::hivg_b16_release(),
                "grounder-clipvg-b16" => GrounderConfig::clipvg_b16(),
                "grounder-qrnet-swin-s" => GrounderConfig::qrnet_swin_s(),
                "grounder-transvg-r50" => GrounderConfig::transvg_r50(),
                _ => GrounderConfig::clip_b16(),
            };
            let g = std::rc::Rc::new(inference(|vb| Grounder::new(vb, &cfg))?);
            Box::new(move |b| {
                let s = cfg.image_size;
                let x = Tensor::randn(0f32, 1.0, (b, 3, s, s), &dev)?;
                let pm = Tensor::ones((b, s, s), DType::F32, &dev)?;
                let ids = Tensor::ones((b, cfg.max_text_len), DType::U32, &dev)?;
                let tm = Tensor::ones((b, cfg.max_text_len), DType::F32, &dev)?;
                let g = g.clone();
                Ok(Box::new(move || {
                    g.forward(&x, &pm, &ids, &tm, Mode::Eval)
                        .map(|_| ())
                        .map_err(Into::into)
                }))
            })
        }
        "synth-small" | "synth-small-train" | "qrnet-synth" | "qrnet-synth-train"
        | "hivg-synth" | "hivg-synth-train" => {
            let train = name.ends_with("-train");
            let cfg = match name.trim_end_matches("-train") {
                "qrnet-synth" => GrounderConfig::qrnet_synth(),
                "hivg-synth" => GrounderConfig::hivg_synth(),
                _ => GrounderConfig::synth_small(),
            };
            // training: on the variables; forward only: detached
            let map = VarMap::new();
            let g = std::rc::Rc::new(if train {
                Grounder::new(gk_train::init::seeded_var_builder(&map, 0, &dev), &cfg)?
            } else {
                inference(|vb| Grounder::new(vb, &cfg))?
            });
            let run_cfg = std::rc::Rc::new(gk_train::train::RunConfig::synth(
                std::path::Path::new("."),
                1,
            ));
            let opt = std::rc::Rc::new(std::cell::RefCell::new(gk_train::optim::AdamW::new(
                &map,
                &[],
                1e-4,
            )?));
            Box::new(move |b| {
                let s = cfg.image_size;
                let x = Tensor::randn(0f32, 1.0, (b, 3, s, s), &dev)?;
                let pm = Tensor::ones((b, s, s), DType::F32, &dev)?;
                let ids = Tensor::ones((b, cfg.max_text_len), DType::U32, &dev)?;
                let tm = Tensor::ones((b, cfg.max_text_len), DType::F32, &dev)?;
                let target = (Tensor::rand(0f32, 0.3, (b, 4), &dev)? + 0.3)?;
                let (g, run_cfg, opt) = (g.clone(), run_cfg.clone(), opt.clone());
                Ok(Box::new(move || {
                    let mode = if train {
                        Mode::Train { seed: 0 }
                    } else {
                        Mode::Eval
                    };
                    let out = g.forward(&x, &pm, &ids, &tm, mode)?;
                    if train {
                        let loss =
                            gk_train::train::criterion(&run_cfg, &out, &target, &ids)?.total()?;
                        let mut grads = loss.backward()?;
                        let mut opt = opt.borrow_mut();
                        opt.clip_grad_norm(&mut grads, 1.0)?;
                        opt.step(&grads, 1e-4)?;
                    }
                    Ok(())
                }))
            })
        }
        other => {
            anyhow::bail!("unknown bench model {other:?} (clip-b16-vision, grounder-clip-b16, grounder-hivg-b16, grounder-hivg-b16-release, grounder-clipvg-b16, grounder-qrnet-swin-s, grounder-transvg-r50, synth-small[-train], qrnet-synth[-train], hivg-synth[-train])")
        }
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    for name in &a.models {
        let run_case = case(name)?;
        for &b in &a.batch {
            let forward = run_case(b)?;
            let ms = median_ms(a.iters, &*forward)?;
            println!(
                "{}",
                serde_json::json!({"impl": "groundkit", "model": name, "batch": b, "threads": threads, "median_ms": ms})
            );
        }
    }
    Ok(())
}
