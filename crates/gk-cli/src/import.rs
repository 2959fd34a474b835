//! `import`: a released checkpoint to an ordinary run folder (`gk_train::import`).

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub family: Family,
}

#[derive(Debug, clap::Subcommand)]
pub enum Family {
    /// TransVG (djiajunustc/TransVG): `TransVG_<dataset>.pth`, R-50 or R-101, zip or legacy
    /// torch container. The config is read from the tensor shapes (and the saved `args` for
    /// head counts, image size and dilation); the file's pickle is decoded without running
    /// any of its code.
    Transvg {
        /// The released checkpoint (`{'model', 'optimizer', 'args', ...}`; only `model` is read).
        #[arg(long)]
        checkpoint: PathBuf,
        /// bert-base-uncased's `vocab.txt` (30522 lines): the checkpoint holds no vocabulary.
        #[arg(long)]
        vocab: PathBuf,
        /// The run folder to write (config.toml, tokenizer.json, best.safetensors, import.json).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(a: ImportArgs) -> Result<()> {
    match a.family {
        Family::Transvg {
            checkpoint,
            vocab,
            out,
        } => {
            crate::commands::refuse_existing_run(&out)?;
            if out.join("best.safetensors").exists() {
                anyhow::bail!("{} already holds imported weights", out.display());
            }
            let t0 = std::time::Instant::now();
            let r = gk_train::import::import_transvg(&checkpoint, &vocab, &out)
                .with_context(|| format!("importing {}", checkpoint.display()))?;
            let kind = match &r.config.visual {
                gk_models::grounder::VisualConfig::Detr(d) => d.backbone.name().map_or_else(
                    || format!("ResNet {:?} x{}", d.backbone.layers, d.backbone.width),
                    str::to_string,
                ),
                _ => "?".into(),
            };
            eprintln!(
                "TransVG {kind} ({} container): {} tensors, {:.1}M values, {} px, max_query_len {}, in {:.1}s",
                r.container,
                r.tensors,
                r.values as f64 / 1e6,
                r.config.image_size,
                r.config.max_text_len,
                t0.elapsed().as_secs_f64()
            );
            if !r.unused.is_empty() {
                eprintln!(
                    "unused checkpoint keys ({}): {}",
                    r.unused.len(),
                    r.unused.join(", ")
                );
            }
            println!("{}", out.display());
            Ok(())
        }
    }
}
