//! `groundkit`: visual grounding in Rust. Train, evaluate, predict and benchmark
//! referring-expression grounders (TransVG, CLIP-VG/HiVG-style) and inspect CLIP models.

mod ablate;
mod bench;
mod commands;
mod datasets;
mod demo;
mod embed;
mod fuzz;
mod import;
mod loadtest;
mod predict;
mod report;
mod serve;
mod teacher;
mod weak;

use clap::{Parser, Subcommand};

use std::process::ExitCode;

/// candle allocates a fresh buffer for every op; glibc's malloc hands large ones back to
/// the kernel, so each training step page-faults them in again. mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Visual grounding toolkit: an image and an expression in, the box of the object out.
#[derive(Debug, Parser)]
#[command(name = "groundkit", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the embedded benchmark, train a grounder on it from scratch, evaluate it,
    /// and draw curves and predictions: the whole pipeline in minutes on a laptop CPU.
    Demo(demo::DemoArgs),
    /// Generate the procedural grounding benchmark (PNG + canonical JSONL), deterministic from a seed.
    Synth(commands::SynthArgs),
    /// Train a grounder (or, with a `[ckd]` table, a weakly supervised CKD model) from a run
    /// config (TOML), or resume an interrupted run.
    Train(commands::TrainArgs),
    /// Turn a released checkpoint (TransVG, HiVG, CLIP-VG) into a run folder that eval, predict, serve
    /// and fine-tuning (`train --init-from`) take like any trained run.
    Import(import::ImportArgs),
    /// Evaluate a run: Acc@0.5, Acc@0.75 and mIoU per split and per expression type (CKD
    /// runs: expression Acc@0.5 and phrase R@1/5/10, and a picture of predictions).
    Eval(commands::EvalArgs),
    /// Convert a published split (TransVG/HiVG .pth lists, or the refer API's refs + instances)
    /// to canonical JSONL, with a .meta.json recording sources, sha256 and row count.
    Convert(datasets::ConvertArgs),
    /// Counts, expression lengths and box sizes of a canonical JSONL file, beside the
    /// published split sizes.
    Stats(datasets::StatsArgs),
    /// Ground expressions with a trained run: one image (prints JSON, writes a picture), or a
    /// JSONL file or folder of many (batched, resumable, one JSON line per expression).
    Predict(predict::PredictArgs),
    /// Serve a run over HTTP: `POST /v1/ground?expression=...` with an image body (or a form)
    /// answers the boxes as JSON; a bounded queue, micro-batching, timeouts, `/metrics`,
    /// `/v1/model`, graceful shutdown on SIGTERM; `GET /` is a page to try it.
    Serve(serve::ServeArgs),
    /// Load-test `serve` on a run (loopback): good clients at each concurrency with malformed,
    /// oversize and slow clients mixed in; throughput, p50/p99, answers by status, memory.
    Loadtest(loadtest::LoadtestArgs),
    /// Print CLIP image and text embeddings (L2-normalised) and their cosine similarity,
    /// from a Hugging Face CLIP folder (config.json, model.safetensors, tokenizer.json).
    Embed(embed::EmbedArgs),
    /// Train a small CLIP teacher on a benchmark's image-caption pairs (scene captions and
    /// object crops) and report its zero-shot retrieval R@1/R@5 on the val split.
    PretrainTeacher(teacher::PretrainArgs),
    /// Train CKD's training-time detector (object classes + background on region
    /// proposals) on a benchmark's objects.jsonl and labels.json.
    TrainDetector(weak::DetectorArgs),
    /// Ablations on the embedded benchmark (`--recipe distill`: baseline vs EpmVG's and
    /// DUET's terms; `qrnet`; `ckd`: weakly supervised NCE vs NCE + distillation vs the
    /// supervised grounder) over seeds and data fractions; a table and a bar chart.
    Ablate(ablate::AblateArgs),
    /// Fuzz every file parser (torch and pickle files, the dataset formats, JSONL, run
    /// configs, tokenizers, safetensors, images) with mutants of the repository's fixtures;
    /// fails on any panic, slow input or runaway memory, saving the inputs.
    Fuzz(fuzz::FuzzArgs),
    /// Time the CLIP-B/16 vision tower and the CLIP-B/16 grounder forward on random
    /// weights (set RAYON_NUM_THREADS to fix the thread count); prints JSON lines.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Synth(a) => commands::synth(a),
        Command::Train(a) => commands::train(a),
        Command::Eval(a) => commands::eval(a),
        Command::Import(a) => import::run(a),
        Command::Convert(a) => datasets::convert(a),
        Command::Stats(a) => datasets::stats(a),
        Command::Predict(a) => predict::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Loadtest(a) => loadtest::run(a),
        Command::Embed(a) => embed::run(a),
        Command::PretrainTeacher(a) => teacher::run(a),
        Command::TrainDetector(a) => weak::train_detector(a),
        Command::Ablate(a) => ablate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Fuzz(a) => fuzz::run_fuzz(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// before it already holds (typed errors print their source inline).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out += ": ";
            }
            out += &text;
        }
    }
    out
}
