//! `groundkit embed`: CLIP image and text embeddings from a Hugging Face CLIP folder.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use gk_data::image_io::{self, Normalize};
use gk_data::tokenize::TextTokenizer;
use gk_models::clip::{l2_normalize, ClipConfig, ClipModel};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// Hugging Face CLIP folder with config.json, model.safetensors and tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// Image file (PNG or JPEG).
    #[arg(long)]
    image: PathBuf,
    /// The text to embed.
    #[arg(long)]
    text: String,
    /// Print JSON (full embeddings) instead of a summary.
    #[arg(long)]
    json: bool,
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let dev = Device::Cpu;
    let cfg_path = a.model.join("config.json");
    let cfg: ClipConfig = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{}: not a CLIP config", cfg_path.display()))?;
    let tok = TextTokenizer::from_file(&a.model.join("tokenizer.json"))?;
    let weights_path = a.model.join("model.safetensors");
    let tensors = gk_train::weights::read_safetensors(&weights_path, &dev)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let model = ClipModel::new(vb, &cfg)
        .with_context(|| format!("{}: weights do not fit the config", weights_path.display()))?;

    let img = image_io::load_rgb(&a.image)?;
    let img = image_io::clip_resize_crop(&img, cfg.vision_config.image_size as u32);
    let pixels = image_io::to_tensor(&img, &Normalize::CLIP, &dev)?.unsqueeze(0)?;
    let enc = tok
        .encode(&a.text, cfg.text_config.max_position_embeddings)
        .context("encoding --text")?;
    let ids = Tensor::new(enc.ids.as_slice(), &dev)?.unsqueeze(0)?;
    let mask = Tensor::new(enc.mask.as_slice(), &dev)?.unsqueeze(0)?;

    let image = l2_normalize(&model.encode_image(&pixels)?.embeds)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let text = l2_normalize(&model.encode_text(&ids, Some(&mask))?.embeds)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let cosine: f32 = image.iter().zip(&text).map(|(a, b)| a * b).sum();
    if a.json {
        let out = serde_json::json!({"image_embedding": image, "text_embedding": text, "cosine": cosine, "truncated": enc.truncated});
        println!("{out}");
    } else {
        let head = |v: &[f32]| {
            v.iter()
                .take(6)
                .map(|x| format!("{x:+.4}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("image embedding [{}]: {} ...", image.len(), head(&image));
        println!("text embedding  [{}]: {} ...", text.len(), head(&text));
        println!(
            "cosine similarity: {cosine:.4}{}",
            if enc.truncated {
                "  (text was truncated)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
