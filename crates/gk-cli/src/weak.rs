//! Weakly supervised grounding (CKD) in the binary: `groundkit train-detector`, and the
//! CKD branches of `train`, `eval`, `predict` and `ablate --recipe ckd` (a run is a CKD run
//! when its config has a `[ckd]` table).

use crate::commands::TrainArgs;
use anyhow::{Context, Result};
use gk_train::ckd::{self, CkdReport, CkdRunConfig};
use gk_train::detector::{self, DetectorTrainConfig};
use gk_train::run::RunDir;
use gk_train::train::TrainOptions;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct DetectorArgs {
    /// A benchmark folder with objects.jsonl and labels.json (`groundkit synth` writes both).
    #[arg(long)]
    pub data: PathBuf,
    /// The detector folder to write (detector.safetensors + detector.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = DetectorTrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn train_detector(a: DetectorArgs) -> Result<()> {
    let cfg = DetectorTrainConfig {
        epochs: a.epochs,
        seed: a.seed,
        ..DetectorTrainConfig::default()
    };
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "train-detector {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    pb.set_message("proposals and crops");
    let meta = detector::train_detector(&a.data, &a.out, &cfg, |step, total, loss| {
        pb.set_length(total as u64);
        pb.set_position(step as u64);
        pb.set_message(format!("cross-entropy {loss:.3}"));
    })
    .with_context(|| format!("training a detector on {}", a.data.display()))?;
    pb.finish_and_clear();
    println!(
        "detector ({} classes + background) written to {}; val accuracy: objects {:.1}%, all crops {:.1}%",
        meta.labels.classes.len(),
        a.out.display(),
        meta.val_object_accuracy,
        meta.val_accuracy
    );
    Ok(())
}

/// Whether the run in `dir` is a CKD run.
pub fn is_ckd_run(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.toml")).is_ok_and(|t| ckd::is_ckd_config(&t))
}

/// `groundkit train` with a CKD config (`text`) or on a CKD run directory.
pub fn train(a: &TrainArgs, text: Option<&str>) -> Result<()> {
    let run = match (text, &a.out, &a.resume) {
        (Some(text), Some(out), _) => {
            let cfg: CkdRunConfig = toml::from_str(text).context("not a valid CKD run config")?;
            crate::commands::refuse_existing_run(out)?;
            ckd::prepare(out, cfg)?
        }
        (_, _, Some(dir)) => RunDir::open(dir)?,
        _ => anyhow::bail!("give --config FILE --out RUN_DIR, or --resume RUN_DIR"),
    };
    let (state, report) = ckd::train(
        &run,
        &TrainOptions {
            stop_after: a.stop_after,
            progress: true,
        },
    )?;
    eprintln!(
        "step {}/{}; last val Acc@0.5 {:.2}% (phrase R@1 {:.2}%), best {:.2}% at step {} ({})",
        state.step,
        state.total_steps,
        report.expressions.all.acc50(),
        report.phrases.summary()["r1"].as_f64().unwrap_or(0.0),
        state.best_acc,
        state.best_step,
        run.path().display()
    );
    Ok(())
}

fn best_weights(run: &RunDir) -> &'static str {
    if run.file("best.safetensors").is_file() {
        "best.safetensors"
    } else {
        "model.safetensors"
    }
}

/// Evaluates a CKD run on `sets` (default: its val and test sets): name, file, report.
pub fn evaluate(dir: &Path, sets: &[PathBuf]) -> Result<Vec<(String, PathBuf, CkdReport)>> {
    let run = RunDir::open(dir)?;
    let cfg: CkdRunConfig = run.load_config()?;
    let sets: Vec<PathBuf> = if sets.is_empty() {
        std::iter::once(cfg.data.val.clone())
            .chain(cfg.data.test.clone())
            .collect()
    } else {
        sets.to_vec()
    };
    let reports = ckd::eval_run(&run, best_weights(&run), &sets, true)
        .with_context(|| format!("evaluating {}", dir.display()))?;
    Ok(sets
        .into_iter()
        .zip(reports)
        .map(|(s, r)| (crate::report::split_name(&s), s, r))
        .collect())
}

/// `groundkit eval` on a CKD run: expression Acc@0.5 / mIoU and phrase R@1/5/10; a sheet
/// of right and wrong predictions of the first set in `RUN/<set>_predictions.png`.
pub const VARIANTS: &[&str] = &["nce", "nce+distill", "nce+distill-sharp", "supervised"];

/// One CKD run of `ablate --recipe ckd` (every variant but `supervised`); scores are
/// Acc@0.5 per split and phrase R@1/5/10 on val.
pub fn ablate_run(
    data: &Path,
    dir: &Path,
    variant: &str,
    detector: Option<&Path>,
    epochs: usize,
    fraction: f64,
    seed: u64,
) -> Result<Vec<(String, f64)>> {
    let run = if dir.join("config.toml").is_file() {
        RunDir::open(dir)?
    } else {
        let mut cfg = CkdRunConfig::synth(data, epochs);
        cfg.seed = seed;
        cfg.data.train_fraction = fraction;
        cfg.optim.eval_every = 1_000_000;
        let detector = || -> Result<Option<PathBuf>> {
            Ok(Some(
                detector
                    .context("the distillation variants need --detector DIR")?
                    .to_path_buf(),
            ))
        };
        match variant {
            "nce" => cfg.ckd.detector = None,
            "nce+distill" => cfg.ckd.detector = detector()?,
            "nce+distill-sharp" => {
                cfg.ckd.detector = detector()?;
                cfg.ckd.teacher_norm = ckd::TeacherNorm::Divide { by: 0.1 };
                cfg.ckd.student_scale = 10.0;
            }
            other => anyhow::bail!("unknown CKD variant {other} ({})", VARIANTS.join(", ")),
        }
        ckd::prepare(dir, cfg)?
    };
    ckd::train(
        &run,
        &TrainOptions {
            stop_after: None,
            progress: false,
        },
    )
    .with_context(|| format!("training {}", dir.display()))?;
    let mut scores = Vec::new();
    let mut phrase = Vec::new();
    for (name, _, r) in evaluate(dir, &[])? {
        scores.push((name.clone(), r.expressions.all.acc50()));
        if name == "val" {
            let p = r.phrases.summary();
            for k in ["r1", "r5", "r10"] {
                phrase.push((format!("val R@{}", &k[1..]), p[k].as_f64().unwrap_or(0.0)));
            }
        }
    }
    scores.extend(phrase);
    Ok(scores)
}
