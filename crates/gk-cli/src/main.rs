//! `groundkit`: visual grounding in Rust. Train, evaluate, predict and benchmark
//! referring-expression grounders (TransVG, CLIP-VG/HiVG-style) and inspect CLIP models.

mod bench;
mod embed;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Visual grounding toolkit: an image and an expression in, the box of the object out.
#[derive(Debug, Parser)]
#[command(name = "groundkit", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print CLIP image and text embeddings (L2-normalised) and their cosine similarity,
    /// from a Hugging Face CLIP folder (config.json, model.safetensors, tokenizer.json).
    Embed(embed::EmbedArgs),
    /// Time the CLIP-B/16 vision tower and the CLIP-B/16 grounder forward on random
    /// weights (set RAYON_NUM_THREADS to fix the thread count); prints JSON lines.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(a) => embed::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
