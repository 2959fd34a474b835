//! `groundkit embed`: CLIP image and text embeddings from a Hugging Face CLIP folder.

use anyhow::{Context, Result};
use candle_core::Device;
use gk_data::image_io;
use gk_train::teacher::Teacher;
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
    let t = Teacher::open(&a.model, &Device::Cpu)
        .with_context(|| format!("loading the CLIP folder {}", a.model.display()))?;
    let img = image_io::load_rgb(&a.image)?;
    let truncated = t
        .tok
        .encode(&a.text, t.meta.max_text_len)
        .context("encoding --text")?
        .truncated;
    let image = t.image_embeds(&[img])?.squeeze(0)?.to_vec1::<f32>()?;
    let text = t
        .text_embeds(&[a.text.as_str()])?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let cosine: f32 = image.iter().zip(&text).map(|(a, b)| a * b).sum();
    if a.json {
        let out = serde_json::json!({"image_embedding": image, "text_embedding": text, "cosine": cosine, "truncated": truncated});
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
            if truncated {
                "  (text was truncated)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
