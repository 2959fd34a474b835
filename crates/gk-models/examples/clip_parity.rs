//! Compares our CLIP with transformers on a folder written by
//! `tools/reference/clip_b16_parity.py OUT` (full-size random ViT-B/16; not committed).
//!
//! `cargo run --release -p gk-models --example clip_parity -- OUT`

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use gk_models::clip::{ClipConfig, ClipModel};

fn main() -> candle_core::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: clip_parity DIR"));
    let dev = Device::Cpu;
    let cfg: ClipConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)
        .map_err(candle_core::Error::wrap)?;
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev)?;
    let model = ClipModel::new(VarBuilder::from_tensors(weights, DType::F32, &dev), &cfg)?;
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev)?;
    let img = model.encode_image(&io["pixel_values"])?;
    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let txt = model.encode_text(&ids, Some(&io["attention_mask"]))?;
    let err = |a: &Tensor, b: &str| -> candle_core::Result<f32> {
        (a - &io[b])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()
    };
    for (name, ours) in [
        ("vision_last", &img.tower.last_hidden_state),
        ("vision_pooled", &img.tower.pooled),
        ("image_embeds", &img.embeds),
        ("text_last", &txt.tower.last_hidden_state),
        ("text_pooled", &txt.tower.pooled),
        ("text_embeds", &txt.embeds),
    ] {
        println!("{name:>14}: max |diff| = {:.3e}", err(ours, name)?);
    }
    println!(
        "{:>14}: max |diff| = {:.3e}",
        "logits",
        err(
            &model.logits_per_image(&img.embeds, &txt.embeds)?,
            "logits_per_image"
        )?
    );
    Ok(())
}
