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
    /// HiVG (linhuixiao/HiVG): a released `best_checkpoint.pth` (fine-tuned Base or Large,
    /// or the mixup-pretrained one). peft 0.3 keys (nested `base_model.model.`) or newer
    /// peft's `base_layer` names; the LoRA pairs are merged into CLIP's weights; the number
    /// of mixed text layers is read from the bridges' shapes.
    Hivg {
        /// The released checkpoint (only its `model` entry is read).
        #[arg(long)]
        checkpoint: PathBuf,
        #[command(flatten)]
        clip: ClipArgs,
        /// How the bridges read the text: `per-sample` (each expression its own text: the
        /// same box at any batch size) or `batched` (HiVG's code, which mixes the text of
        /// the samples of a batch: the released numbers were made so; boxes depend on the
        /// batch and on each sample's place in it).
        #[arg(long, value_enum, default_value = "per-sample")]
        bridge_mode: BridgeModeArg,
        /// LoRA scale alpha / r (HiVG's set_HiLoRA: 16 / 32).
        #[arg(long, default_value_t = 0.5)]
        lora_scale: f32,
        /// Keep the LoRA pairs as a LoRA set named after the file's adapter (`default`), to
        /// train them further, instead of merging them into CLIP's weights.
        #[arg(long)]
        keep_lora: bool,
    },
    /// CLIP-VG (linhuixiao/CLIP-VG): a released checkpoint (OpenAI CLIP ViT-B/16 in half
    /// precision, multi-layer visual features, a 512-wide fusion).
    ClipVg {
        /// The released checkpoint (only its `model` entry is read).
        #[arg(long)]
        checkpoint: PathBuf,
        #[command(flatten)]
        clip: ClipArgs,
    },
}

/// What every CLIP-based import needs.
#[derive(Debug, clap::Args)]
pub struct ClipArgs {
    /// CLIP's tokenizer: a `tokenizer.json` or a Hugging Face CLIP folder holding one
    /// (e.g. openai/clip-vit-base-patch16); the checkpoint holds none.
    #[arg(long)]
    tokenizer: PathBuf,
    /// The run folder to write (config.toml, tokenizer.json, best.safetensors, import.json).
    #[arg(long)]
    out: PathBuf,
    /// CLIP's head counts VISION,TEXT when the towers are not CLIP's 64-wide heads.
    #[arg(long, value_parser = parse_heads)]
    heads: Option<(usize, usize)>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BridgeModeArg {
    PerSample,
    Batched,
}

fn parse_heads(s: &str) -> std::result::Result<(usize, usize), String> {
    let (a, b) = s.split_once(',').ok_or("expected VISION,TEXT, e.g. 12,8")?;
    let n = |x: &str| x.trim().parse::<usize>().map_err(|e| format!("{x:?}: {e}"));
    Ok((n(a)?, n(b)?))
}

/// Refuses to import over an existing run.
fn check_out(out: &std::path::Path) -> Result<()> {
    crate::commands::refuse_existing_run(out)?;
    if out.join("best.safetensors").exists() {
        anyhow::bail!("{} already holds imported weights", out.display());
    }
    Ok(())
}

/// What every import prints: the unused keys on stderr, the run folder on stdout.
fn finish(r: &gk_train::import::ImportReport, out: &std::path::Path) {
    if !r.unused.is_empty() {
        eprintln!(
            "unused checkpoint keys ({}): {}",
            r.unused.len(),
            r.unused.join(", ")
        );
    }
    println!("{}", out.display());
}

/// A CLIP-based import: the function, its name, then the summary line.
fn import_clip(
    name: &str,
    checkpoint: &std::path::Path,
    clip: &ClipArgs,
    opts: &gk_train::import::HivgImport,
    import: fn(
        &std::path::Path,
        &std::path::Path,
        &std::path::Path,
        &gk_train::import::HivgImport,
    ) -> gk_train::Result<gk_train::import::ImportReport>,
) -> Result<()> {
    check_out(&clip.out)?;
    let t0 = std::time::Instant::now();
    let r = import(checkpoint, &clip.tokenizer, &clip.out, opts)
        .with_context(|| format!("importing {}", checkpoint.display()))?;
    let what = match &r.config.visual {
        gk_models::grounder::VisualConfig::Hivg(h) => format!(
            "ViT {}x{} /{}, bridges in layers {:?} reading text layers {:?}, bridge mode {:?}",
            h.vision.num_hidden_layers,
            h.vision.hidden_size,
            h.vision.patch_size,
            h.bridge_layers,
            h.text_layers,
            h.bridge_mode
        ),
        _ => "?".into(),
    };
    eprintln!(
        "{name} ({} container): {what}; {} tensors, {:.1}M values, {} LoRA pairs merged, {} kept, {} px, {} text tokens, in {:.1}s",
        r.container,
        r.tensors,
        r.values as f64 / 1e6,
        r.lora_merged,
        r.lora_kept,
        r.config.image_size,
        r.config.max_text_len,
        t0.elapsed().as_secs_f64()
    );
    finish(&r, &clip.out);
    Ok(())
}

pub fn run(a: ImportArgs) -> Result<()> {
    match a.family {
        Family::Transvg {
            checkpoint,
            vocab,
            out,
        } => {
            check_out(&out)?;
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
            finish(&r, &out);
            Ok(())
        }
        Family::Hivg {
            checkpoint,
            clip,
            bridge_mode,
            lora_scale,
            keep_lora,
        } => {
            let opts = gk_train::import::HivgImport {
                heads: clip.heads,
                lora_scale,
                keep_lora,
                bridge_mode: match bridge_mode {
                    BridgeModeArg::PerSample => gk_models::hivg::BridgeMode::PerSample,
                    BridgeModeArg::Batched => gk_models::hivg::BridgeMode::Batched,
                },
            };
            import_clip(
                "HiVG",
                &checkpoint,
                &clip,
                &opts,
                gk_train::import::import_hivg,
            )
        }
        Family::ClipVg { checkpoint, clip } => {
            let opts = gk_train::import::HivgImport {
                heads: clip.heads,
                ..Default::default()
            };
            import_clip(
                "CLIP-VG",
                &checkpoint,
                &clip,
                &opts,
                gk_train::import::import_clipvg,
            )
        }
    }
}
