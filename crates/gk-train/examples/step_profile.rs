//! Times the parts of one training step of the demo grounder (batch 32, random data).
//! `cargo run --release -p gk-train --example step_profile`

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use gk_models::grounder::{Grounder, GrounderConfig};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = GrounderConfig::synth_small();
    let map = VarMap::new();
    let g = Grounder::new(gk_train::init::seeded_var_builder(&map, 0, &dev), &cfg)?;
    let b = 32;
    let s = cfg.image_size;
    let x = Tensor::randn(0f32, 1.0, (b, 3, s, s), &dev)?;
    let pm = Tensor::ones((b, s, s), DType::F32, &dev)?;
    let ids = Tensor::ones((b, cfg.max_text_len), DType::U32, &dev)?;
    let tm = Tensor::ones((b, cfg.max_text_len), DType::F32, &dev)?;
    for _ in 0..3 {
        let t0 = Instant::now();
        let text = g.text.forward(&ids, &tm)?;
        let vis = g.visual.forward(&x, &pm, &text, &tm)?;
        let t1 = Instant::now();
        let out = g.forward(&x, &pm, &ids, &tm, gk_models::nn::Mode::Train { seed: 0 })?;
        let t2 = Instant::now();
        let loss = out.pred_box.sum_all()?;
        let grads = loss.backward()?;
        let t3 = Instant::now();
        let t4 = Instant::now();
        let g2 = vis.tokens.sum_all()?.backward()?;
        let t5 = Instant::now();
        let ln = gk_models::nn::LayerNorm::new(
            candle_nn::VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
            128,
            1e-5,
        )?;
        let xv = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, 86, 128), &dev)?)?;
        let t6 = Instant::now();
        let y = candle_core::Module::forward(&ln, xv.as_tensor())?;
        let t7 = Instant::now();
        let _g3 = y.sum_all()?.backward()?;
        let t8 = Instant::now();
        println!(
            "visual-only backward {:.0} ms; one layer norm fwd {:.2} ms bwd {:.2} ms",
            (t5 - t4).as_secs_f64() * 1e3,
            (t7 - t6).as_secs_f64() * 1e3,
            (t8 - t7).as_secs_f64() * 1e3
        );
        drop((vis, grads, g2));
        println!(
            "visual fwd {:.0} ms, full fwd {:.0} ms, backward {:.0} ms",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            (t3 - t2).as_secs_f64() * 1e3
        );
    }
    Ok(())
}
