//! `groundkit pretrain-teacher`: a small CLIP trained on the benchmark's image-caption
//! pairs, the teacher of the distillation recipes when no real CLIP is at hand.

use anyhow::{Context, Result};
use gk_train::teacher::{self, PretrainConfig, Recall};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct PretrainArgs {
    /// A benchmark folder written by `groundkit synth` (captions.jsonl, objects.jsonl, images/).
    #[arg(long)]
    pub data: PathBuf,
    /// The teacher folder to write (Hugging Face CLIP layout + teacher.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Epochs over the scene captions and object crops.
    #[arg(long, default_value_t = PretrainConfig::synth().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Scene captions only (no object crops).
    #[arg(long)]
    pub no_object_crops: bool,
}

pub fn run(a: PretrainArgs) -> Result<()> {
    let cfg = PretrainConfig {
        epochs: a.epochs,
        seed: a.seed,
        object_crops: !a.no_object_crops,
        ..PretrainConfig::synth()
    };
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "pretrain-teacher {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    // Without a terminal (logs, CI) the bar is hidden: print a line every 50 steps instead.
    let lines = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let report = teacher::pretrain(
        &a.data,
        &a.out,
        &cfg,
        &candle_core::Device::Cpu,
        |step, total, loss| {
            pb.set_length(total as u64);
            pb.set_position(step as u64);
            pb.set_message(format!("InfoNCE {loss:.3}"));
            if lines && (step % 50 == 0 || step == total) {
                eprintln!("pretrain-teacher step {step}/{total} InfoNCE {loss:.3}");
            }
        },
    )
    .with_context(|| format!("pretraining a teacher on {}", a.data.display()))?;
    pb.finish_and_clear();
    let row = |name: &str, r: &Recall| {
        println!(
            "{name:<14} {:>5} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            r.n, r.image_to_text_r1, r.image_to_text_r5, r.text_to_image_r1, r.text_to_image_r5
        )
    };
    println!("zero-shot retrieval on the val split (%):");
    println!(
        "{:<14} {:>5} {:>8} {:>8} {:>8} {:>8}",
        "pairs", "n", "i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5"
    );
    row("scene captions", &report.scenes);
    row("object crops", &report.objects);
    println!("teacher written to {}", a.out.display());
    Ok(())
}
