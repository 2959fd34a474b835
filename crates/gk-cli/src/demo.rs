//! `groundkit demo`: the embedded benchmark end to end on a fresh machine.

use crate::{commands, report};
use anyhow::Result;
use gk_data::synth::SynthConfig;
use gk_train::eval::GtBoxes;
use gk_train::train::{self, RunConfig, TrainOptions};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Folder for the benchmark and the run (replaced if it holds an earlier demo).
    #[arg(long, default_value = "demo-run")]
    pub out: PathBuf,
    /// Training epochs over the demo's training split (12 fit the 10-minute budget on 2 cores).
    #[arg(long, default_value_t = 12)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let data = a.out.join("data");
    let run_dir = a.out.join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)?;
    }
    eprintln!(
        "1/4 generating the embedded benchmark into {}",
        data.display()
    );
    commands::generate(
        &SynthConfig {
            seed: a.seed,
            ..SynthConfig::small()
        },
        &data,
    )?;

    eprintln!("2/4 training a grounder from scratch ({} epochs)", a.epochs);
    let mut cfg = RunConfig::synth(&data, a.epochs);
    cfg.seed = a.seed;
    let run = train::prepare(&run_dir, cfg)?;
    let (state, _) = train::train(
        &run,
        &TrainOptions {
            stop_after: None,
            progress: true,
        },
    )?;

    eprintln!(
        "3/4 evaluating the best checkpoint (step {}, val Acc@0.5 {:.2}%)",
        state.best_step, state.best_acc
    );
    let model = gk_train::infer::open(&run)?;
    let data_cfg = &model.info().data;
    let sets = report::run_sets(data_cfg);
    let reports = report::evaluate_sets(
        model.as_ref(),
        data_cfg,
        &sets,
        GtBoxes::Stored,
        report::EVAL_BATCH,
    )?;
    let table = report::table(&reports);
    println!("{table}");
    std::fs::write(run.file("results.txt"), &table)?;
    let json: serde_json::Map<String, serde_json::Value> = reports
        .iter()
        .map(|(n, r)| (n.clone(), r.summary()))
        .collect();
    run.save_json("report.json", &json)?;

    eprintln!("4/4 drawing pictures");
    report::curves(&run, &run.file("curves.png"))?;
    for (i, (name, r)) in reports.iter().enumerate() {
        report::prediction_sheet(
            data_cfg,
            &sets[i],
            r,
            8,
            &run.file(&format!("predictions_{name}.png")),
        )?;
    }
    eprintln!(
        "done in {:.0}s. Pictures: {}/curves.png, predictions_*.png. Try:\n  groundkit predict --run {} --image {}/images/val/000000.png --expr \"the leftmost shape\"",
        t0.elapsed().as_secs_f64(),
        run.path().display(),
        run.path().display(),
        data.display()
    );
    Ok(())
}
