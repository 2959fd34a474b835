//! `fuzz`: the long fuzz run of every parser (`gk_data::fuzz`), plus the run-config TOML
//! parser of `gk_train` (grounder and CKD configs), with a progress bar; failing inputs are
//! saved, and any failure exits 1.

use anyhow::Result;
use gk_data::fuzz::{run, targets, Bounds, Target};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Inputs per parser (the seeds first, then mutants of them).
    #[arg(long, default_value_t = 100_000)]
    inputs: u64,
    /// Which parsers (default: all): pickle, torch, jsonl, refer-refs, coco-instances,
    /// referit, flickr-sentences, flickr-annotation, tokenizer, safetensors, image, config.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Seed of the mutations (a run replays exactly).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The repository root, whose committed fixtures are the seeds.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Where failing inputs are written.
    #[arg(long, default_value = "fuzz-failures")]
    save: PathBuf,
    /// Per-input time bound, milliseconds.
    #[arg(long, default_value_t = 2000)]
    time_ms: u64,
    /// Print the summary as JSON lines.
    #[arg(long)]
    json: bool,
}

/// The run-config parser: grounder configs and CKD configs, as `train` reads them.
fn config_target(root: &Path) -> Target {
    let seeds = std::fs::read_dir(root.join("configs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    Target {
        name: "config",
        seeds,
        parse: Box::new(|b| {
            let text = std::str::from_utf8(b).map_err(|e| e.to_string())?;
            if gk_train::ckd::is_ckd_config(text) {
                toml::from_str::<gk_train::ckd::CkdRunConfig>(text)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                toml::from_str::<gk_train::train::RunConfig>(text)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }),
    }
}

pub fn run_fuzz(a: FuzzArgs) -> Result<()> {
    let mut all = targets(&a.root);
    all.push(config_target(&a.root));
    if !a.targets.is_empty() {
        if let Some(bad) = a.targets.iter().find(|t| !all.iter().any(|x| x.name == *t)) {
            let names: Vec<&str> = all.iter().map(|t| t.name).collect();
            anyhow::bail!("no parser {bad:?} (there are: {})", names.join(", "));
        }
        all.retain(|t| a.targets.iter().any(|n| n == t.name));
    }
    let bounds = Bounds {
        inputs: a.inputs,
        seed: a.seed,
        time: std::time::Duration::from_millis(a.time_ms),
        save: Some(a.save.clone()),
        ..Default::default()
    };
    let mut failures = 0;
    for t in &all {
        if t.seeds.is_empty() {
            anyhow::bail!(
                "{}: no seed files under {} (run from the repository root or pass --root)",
                t.name,
                a.root.display()
            );
        }
        let pb = indicatif::ProgressBar::new(a.inputs).with_message(t.name);
        pb.set_style(indicatif::ProgressStyle::with_template(
            "{msg:18} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec}",
        )?);
        let t0 = std::time::Instant::now();
        let r = run(t, &bounds, |n| pb.set_position(n));
        pb.finish_and_clear();
        failures += r.failures.len();
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:18} {:>9} inputs in {:>6.1}s: {:>8} accepted {:>9} refused {:>3} failures; slowest {:.1} ms, resident growth {}",
                r.target,
                r.inputs,
                t0.elapsed().as_secs_f64(),
                r.accepted,
                r.refused,
                r.failures.len(),
                r.slowest_ms,
                r.max_rss_growth
                    .map_or("n/a".into(), |g| format!("{:.1} MB", g as f64 / 1e6))
            );
        }
        for (kind, msg, saved) in &r.failures {
            eprintln!(
                "  {kind}: {msg} ({})",
                saved
                    .as_ref()
                    .map_or("not saved".into(), |p| p.display().to_string())
            );
        }
    }
    if failures > 0 {
        anyhow::bail!(
            "{failures} failing inputs, saved under {}",
            a.save.display()
        );
    }
    Ok(())
}
