//! `synth`, `train`, `eval` and `predict`.

use crate::report;
use anyhow::{Context, Result};
use gk_data::synth::{self, SynthConfig};
use gk_train::eval::GtBoxes;
use gk_train::run::RunDir;
use gk_train::train::{self, RunConfig, TrainOptions};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Output folder (PNG images + JSONL splits + captions + objects + meta.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Start from this size preset: small (the demo's) or tiny (tests).
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long)]
    pub train: Option<usize>,
    #[arg(long)]
    pub val: Option<usize>,
    #[arg(long)]
    pub test_a: Option<usize>,
    #[arg(long)]
    pub test_b: Option<usize>,
    #[arg(long)]
    pub heldout: Option<usize>,
    /// Square image side in pixels.
    #[arg(long)]
    pub image_size: Option<u32>,
}

impl SynthArgs {
    pub fn config(&self) -> Result<SynthConfig> {
        let mut c = match self.preset.as_str() {
            "small" => SynthConfig::small(),
            "tiny" => SynthConfig::tiny(),
            p => anyhow::bail!("unknown --preset {p:?} (small, tiny)"),
        };
        c.seed = self.seed;
        c.train = self.train.unwrap_or(c.train);
        c.val = self.val.unwrap_or(c.val);
        c.test_a = self.test_a.unwrap_or(c.test_a);
        c.test_b = self.test_b.unwrap_or(c.test_b);
        c.heldout = self.heldout.unwrap_or(c.heldout);
        c.image_size = self.image_size.unwrap_or(c.image_size);
        Ok(c)
    }
}

/// Generates the benchmark with a progress bar; prints the split counts.
pub fn synth(a: SynthArgs) -> Result<()> {
    let cfg = a.config()?;
    generate(&cfg, &a.out)?;
    Ok(())
}

pub fn generate(cfg: &SynthConfig, out: &std::path::Path) -> Result<synth::SynthSummary> {
    let pb = indicatif::ProgressBar::new(0).with_message("generating scenes");
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    )?);
    let summary = synth::generate(cfg, out, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })
    .with_context(|| format!("generating the benchmark into {}", out.display()))?;
    pb.finish_and_clear();
    let splits: Vec<String> = summary
        .splits
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    let types: Vec<String> = summary
        .by_type
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    eprintln!(
        "wrote {} ({} images): {}; by type: {}",
        out.display(),
        summary.images,
        splits.join(", "),
        types.join(", ")
    );
    Ok(summary)
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Run config (TOML, as written to RUN_DIR/config.toml). Required unless --resume.
    #[arg(long, conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// New run directory (with --config).
    #[arg(long, requires = "config")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted run from its last checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop after this many optimiser steps in total (checkpointed; resume later).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Start from the weights of this run (its best.safetensors, or model.safetensors): e.g.
    /// fine-tune an imported published model. Every parameter must match by name and shape.
    #[arg(long, requires = "config")]
    pub init_from: Option<PathBuf>,
    /// With HiLoRA stages in the config: run only stage K (its predecessor must have
    /// finished under --out). Without: every stage in order, finished ones kept.
    #[arg(long, requires = "config")]
    pub stage: Option<usize>,
}

/// A config with `[hilora]` stages: each stage is a run under `OUT/stage{k}`; running the
/// command again continues where it stopped.
fn train_stages(a: &TrainArgs, cfg: &RunConfig, out: &std::path::Path) -> Result<()> {
    let done = gk_train::hilora::train_stages(
        out,
        cfg,
        a.stage,
        &TrainOptions {
            stop_after: a.stop_after,
            progress: true,
        },
    )?;
    println!("| HiLoRA stage | best val Acc@0.5 (%) |\n|---|---:|");
    for (k, acc) in done {
        println!("| {k} | {acc:.2} |");
    }
    Ok(())
}

/// `train --config ... --out DIR` never overwrites a run.
pub fn refuse_existing_run(out: &std::path::Path) -> Result<()> {
    if out.join("trainer_state.json").exists() {
        anyhow::bail!(
            "{} already holds a run: use --resume {} to continue it",
            out.display(),
            out.display()
        );
    }
    Ok(())
}

pub fn train(a: TrainArgs) -> Result<()> {
    let run = match (&a.resume, &a.config, &a.out) {
        (Some(dir), _, _) if crate::weak::is_ckd_run(dir) => return crate::weak::train(&a, None),
        (Some(dir), _, _) => RunDir::open(dir)?,
        (None, Some(cfg_path), Some(out)) => {
            let text = std::fs::read_to_string(cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            if gk_train::ckd::is_ckd_config(&text) {
                if a.init_from.is_some() {
                    anyhow::bail!(
                        "--init-from takes grounder runs; CKD configs start from scratch"
                    );
                }
                return crate::weak::train(&a, Some(&text))
                    .with_context(|| format!("{}: CKD run", cfg_path.display()));
            }
            let mut cfg: RunConfig = toml::from_str(&text)
                .with_context(|| format!("{}: not a valid run config", cfg_path.display()))?;
            if let Some(from) = &a.init_from {
                let from = RunDir::open(from)?;
                cfg.pretrained.push(gk_train::train::PretrainedConfig {
                    file: from.file(gk_train::infer::serving_weights(&from)),
                    from: String::new(),
                    to: String::new(),
                    strict: true,
                    format: Default::default(),
                });
            }
            if cfg.hilora.is_some() {
                return train_stages(&a, &cfg, out);
            }
            if a.stage.is_some() {
                anyhow::bail!("--stage needs a config with [hilora] stages");
            }
            refuse_existing_run(out)?;
            train::prepare(out, cfg)?
        }
        _ => anyhow::bail!("give --config FILE --out RUN_DIR, or --resume RUN_DIR"),
    };
    let (state, report) = train::train(
        &run,
        &TrainOptions {
            stop_after: a.stop_after,
            progress: true,
        },
    )?;
    eprintln!(
        "step {}/{}; last val Acc@0.5 {:.2}%, best {:.2}% at step {} ({})",
        state.step,
        state.total_steps,
        report.all.acc50(),
        state.best_acc,
        state.best_step,
        run.path().display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// JSONL sets to evaluate (default: the run's val and test sets).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Image root for --data (default: each file's folder).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Score against TransVG's integer-truncated ground-truth boxes (its loader casts the
    /// source numbers to int), to reproduce published numbers exactly.
    #[arg(long)]
    pub transvg_int_boxes: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Queries per forward, in the set's order. Only models whose answers depend on the
    /// batch (HiVG imported with `--bridge-mode batched`) give other numbers at another
    /// size; HiVG's scripts evaluate in batches of 60 (Base) or 32 (Large), spread over 7
    /// GPUs.
    #[arg(long, default_value_t = report::EVAL_BATCH)]
    pub batch: usize,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let run = RunDir::open(&a.run)?;
    let model = gk_train::infer::open(&run)
        .with_context(|| format!("loading the run {}", a.run.display()))?;
    let mut data = model.info().data.clone();
    if a.images.is_some() {
        data.image_root = a.images.clone();
    }
    let sets = if a.data.is_empty() {
        report::run_sets(&data)
    } else {
        a.data.clone()
    };
    let gt = if a.transvg_int_boxes {
        GtBoxes::TransvgInt
    } else {
        GtBoxes::Stored
    };
    if let Some(note) = &model.info().batch_dependent {
        eprintln!(
            "{note}: evaluated in batches of {} in the order of each set's file",
            a.batch
        );
    }
    let mut reports = report::evaluate_sets(model.as_ref(), &data, &sets, gt, a.batch.max(1))?;
    reports.sort_by_key(|(name, _)| report::paper_column(name));
    if let Some((name, r)) = reports.first() {
        if let Some(set) = sets.iter().find(|s| &report::split_name(s) == name) {
            let out = a.run.join(format!("{name}_predictions.png"));
            report::prediction_sheet(&data, set, r, 8, &out)?;
            eprintln!("predictions drawn in {}", out.display());
        }
    }
    if a.json {
        let v: serde_json::Map<String, serde_json::Value> = reports
            .iter()
            .map(|(n, r)| (n.clone(), r.summary()))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let info = model.info();
        eprintln!(
            "{} model ({} parameters, {} px, {} text tokens) from {}",
            info.kind,
            info.parameters,
            info.image_size,
            info.max_text_len,
            info.weights.display()
        );
        print!("{}", report::table(&reports));
    }
    Ok(())
}
