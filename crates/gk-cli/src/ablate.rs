//! `groundkit ablate --recipe distill|qrnet|ckd`: the distillation ablation, QRNet's
//! (against the demo model; without its channel gate, spatial gate or query-aware neck)
//! and CKD's (weakly supervised NCE vs NCE + detector distillation, beside the supervised
//! demo model) on the embedded benchmark. Every variant x data fraction x seed is one ordinary run under
//! `<out>/runs/` (finished runs are reused with their scores, interrupted ones resumed), evaluated on val and
//! the test splits; the table (mean and std over seeds) goes to `<out>/results.md` and
//! `results.json`, the bar chart to `<out>/ablation.png`. Runs evaluate once, at the end.

use crate::report;
use anyhow::{bail, Context, Result};
use gk_models::grounder::{GrounderConfig, VisualConfig};
use gk_train::distill::{DistillConfig, FeatureLoss, SlaConfig};
use gk_train::draw::{self, Bars};
use gk_train::eval::GtBoxes;
use gk_train::run::RunDir;
use gk_train::train::{self, RunConfig, TrainOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Recipe {
    /// Baseline vs EpmVG's terms (feature, cross-modal, both) and DUET's (teacher, self, both).
    Distill,
    /// The demo model vs QRNet-tiny and QRNet without its channel gate, spatial gate, neck.
    Qrnet,
    /// Weakly supervised CKD: NCE alone, NCE + distillation, and the supervised demo model.
    Ckd,
}

impl Recipe {
    fn default_variants(self) -> &'static str {
        match self {
            Recipe::Distill => "baseline,epmvg,duet-teacher,duet-self,duet",
            Recipe::Qrnet => "baseline,qrnet,qrnet-no-channel,qrnet-no-spatial,qrnet-no-neck",
            Recipe::Ckd => "nce,nce+distill,nce+distill-sharp,supervised",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct AblateArgs {
    #[arg(long, value_enum)]
    pub recipe: Recipe,
    /// A benchmark folder written by `groundkit synth`.
    #[arg(long)]
    pub data: PathBuf,
    /// The teacher folder (`groundkit pretrain-teacher` or a Hugging Face CLIP); the
    /// distill recipe needs it.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// The detector folder (`groundkit train-detector`); the ckd recipe's nce+distill needs it.
    #[arg(long)]
    pub detector: Option<PathBuf>,
    /// Output folder (runs, table, chart).
    #[arg(long)]
    pub out: PathBuf,
    /// Seeds per variant and fraction.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Fractions of the training set (low-data settings).
    #[arg(long, value_delimiter = ',', default_value = "0.1,1.0")]
    pub fractions: Vec<f64>,
    /// Epochs at full data; a fraction f trains epochs / f epochs (the same number of steps).
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// Variants. distill: baseline, epmvg-feature, epmvg-cross, epmvg, duet-teacher,
    /// duet-self, duet (teacher + self), epmvg+duet-teacher, epmvg+duet (default: baseline,
    /// epmvg, duet-teacher, duet-self, duet). qrnet: baseline, qrnet, qrnet-no-channel,
    /// qrnet-no-spatial, qrnet-no-neck (default: all). ckd: nce, nce+distill,
    /// nce+distill-sharp, supervised (default: all).
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
}

/// The variants and what they turn on: EpmVG's feature and cross-modal terms, DUET's
/// teacher terms (region + shared space) and its self-distillation (SLA region contrast).
const VARIANTS: &[(&str, [f64; 4])] = &[
    ("baseline", [0.0; 4]),
    ("epmvg-feature", [1.0, 0.0, 0.0, 0.0]),
    ("epmvg-cross", [0.0, 1.0, 0.0, 0.0]),
    ("epmvg", [1.0, 1.0, 0.0, 0.0]),
    ("duet-teacher", [0.0, 0.0, 1.0, 0.0]),
    ("duet-self", [0.0, 0.0, 0.0, 1.0]),
    ("duet", [0.0, 0.0, 1.0, 1.0]),
    ("epmvg+duet-teacher", [1.0, 1.0, 1.0, 0.0]),
    ("epmvg+duet", [1.0, 1.0, 1.0, 1.0]),
];

const QRNET_VARIANTS: &[&str] = &[
    "baseline",
    "qrnet",
    "qrnet-no-channel",
    "qrnet-no-spatial",
    "qrnet-no-neck",
];

/// Sets `cfg` up as `variant` of the recipe (an error names the known variants).
fn apply_variant(a: &AblateArgs, variant: &str, cfg: &mut RunConfig) -> Result<()> {
    match a.recipe {
        Recipe::Distill => {
            let teacher = a
                .teacher
                .as_deref()
                .context("--recipe distill needs --teacher DIR")?;
            cfg.distill = distill_for(variant, teacher)?;
        }
        Recipe::Qrnet => {
            if !QRNET_VARIANTS.contains(&variant) {
                bail!("unknown variant {variant} ({})", QRNET_VARIANTS.join(", "));
            }
            if variant != "baseline" {
                let mut model = GrounderConfig::qrnet_synth();
                if let VisualConfig::QrNet(q) = &mut model.visual {
                    q.channel = variant != "qrnet-no-channel";
                    q.spatial = variant != "qrnet-no-spatial";
                    q.neck = variant != "qrnet-no-neck";
                }
                cfg.model = model;
            }
        }
        Recipe::Ckd => {
            if !crate::weak::VARIANTS.contains(&variant) {
                bail!(
                    "unknown variant {variant} ({})",
                    crate::weak::VARIANTS.join(", ")
                );
            }
            if variant.starts_with("nce+distill") && a.detector.is_none() {
                bail!("variant {variant} needs --detector DIR");
            }
        }
    }
    Ok(())
}

fn distill_for(variant: &str, teacher: &Path) -> Result<Option<DistillConfig>> {
    let Some((_, [feature, cross, duet_teacher, duet_self])) =
        VARIANTS.iter().find(|(name, _)| *name == variant)
    else {
        let names: Vec<&str> = VARIANTS.iter().map(|(n, _)| *n).collect();
        bail!("unknown variant {variant} ({})", names.join(", "));
    };
    if variant == "baseline" {
        return Ok(None);
    }
    Ok(Some(DistillConfig {
        teacher: teacher.to_path_buf(),
        teacher_dim: 0,
        feature: *feature,
        feature_kind: FeatureLoss::Cosine,
        cross: *cross,
        temperature: 2.0,
        duet_region: *duet_teacher,
        duet_align: *duet_teacher,
        duet_self: *duet_self,
        sla: SlaConfig::default(),
        live: false,
    }))
}

/// Val and test splits of a run, Acc@0.5 per split name.
type Scores = Vec<(String, f64)>;

/// One run's scores, cached in its `ablate_scores.json` (finished runs are not redone).
fn run_one(a: &AblateArgs, variant: &str, fraction: f64, seed: u64) -> Result<Scores> {
    let dir = a
        .out
        .join("runs")
        .join(format!("f{fraction}"))
        .join(variant)
        .join(format!("seed{seed}"));
    let scores_file = dir.join("ablate_scores.json");
    if scores_file.is_file() {
        return Ok(serde_json::from_str(&std::fs::read_to_string(
            &scores_file,
        )?)?);
    }
    let epochs = ((a.epochs as f64 / fraction).round() as usize).max(1);
    let scores = if a.recipe == Recipe::Ckd && variant != "supervised" {
        crate::weak::ablate_run(
            &a.data,
            &dir,
            variant,
            a.detector.as_deref(),
            epochs,
            fraction,
            seed,
        )?
    } else {
        grounder_run(a, &dir, variant, epochs, fraction, seed)?
    };
    gk_train::weights::write_atomic(&scores_file, serde_json::to_string(&scores)?.as_bytes())?;
    Ok(scores)
}

/// Trains (or resumes) one grounder run and scores its best weights on val and the tests.
fn grounder_run(
    a: &AblateArgs,
    dir: &Path,
    variant: &str,
    epochs: usize,
    fraction: f64,
    seed: u64,
) -> Result<Scores> {
    let run = if dir.join("config.toml").is_file() {
        RunDir::open(dir)?
    } else {
        let mut cfg = RunConfig::synth(&a.data, epochs);
        cfg.seed = seed;
        cfg.data.train_fraction = fraction;
        apply_variant(a, variant, &mut cfg)?;
        // One evaluation, at the end: the table reports the last checkpoint of every run.
        cfg.optim.eval_every = 1_000_000;
        train::prepare(dir, cfg)?
    };
    train::train(
        &run,
        &TrainOptions {
            stop_after: None,
            progress: false,
        },
    )
    .with_context(|| format!("training {}", dir.display()))?;
    let model = gk_train::infer::open(&run)?;
    let data = &model.info().data;
    let reports = report::evaluate_sets(
        model.as_ref(),
        data,
        &report::run_sets(data),
        GtBoxes::Stored,
        report::EVAL_BATCH,
    )?;
    Ok(reports
        .iter()
        .map(|(n, r)| (n.clone(), r.all.acc50()))
        .collect())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

pub fn run(mut a: AblateArgs) -> Result<()> {
    if a.variants.is_empty() {
        a.variants = a
            .recipe
            .default_variants()
            .split(',')
            .map(String::from)
            .collect();
    }
    for v in &a.variants {
        // reject unknown variants before hours of training
        apply_variant(&a, v, &mut RunConfig::synth(&a.data, 1))?;
    }
    if a.fractions.iter().any(|f| !(*f > 0.0 && *f <= 1.0)) {
        bail!("--fractions must lie in (0, 1]");
    }
    std::fs::create_dir_all(&a.out)?;
    // results[fraction][variant] = per seed scores
    let mut rows: Vec<(f64, String, Vec<Scores>)> = Vec::new();
    let total = a.fractions.len() * a.variants.len() * a.seeds.len();
    let mut k = 0;
    for &f in &a.fractions {
        for v in &a.variants {
            let mut per_seed = Vec::new();
            for &s in &a.seeds {
                k += 1;
                eprintln!("[{k}/{total}] fraction {f}, {v}, seed {s}");
                per_seed.push(run_one(&a, v, f, s)?);
            }
            rows.push((f, v.clone(), per_seed));
        }
    }
    // columns: every score name in the order first seen (variants may report more)
    let mut splits: Vec<String> = Vec::new();
    for (n, _) in rows.iter().flat_map(|r| r.2.iter().flatten()) {
        if !splits.contains(n) {
            splits.push(n.clone());
        }
    }
    let values = |per_seed: &[Scores], split: &str| -> Vec<f64> {
        per_seed
            .iter()
            .filter_map(|s| s.iter().find(|(n, _)| n == split).map(|(_, x)| *x))
            .collect()
    };
    let stat = |per_seed: &[Scores], split: &str| mean_std(&values(per_seed, split));
    let mut md = format!(
        "Acc@0.5 (%), mean ± std over seeds {:?}; {} epochs at full data, epochs / fraction below it (same steps).\n\n| fraction | variant | {} |\n|---|---|{}\n",
        a.seeds,
        a.epochs,
        splits.join(" | "),
        "---:|".repeat(splits.len())
    );
    let mut json = Vec::new();
    for (f, v, per_seed) in &rows {
        let cells: Vec<String> = splits
            .iter()
            .map(|s| {
                if values(per_seed, s).is_empty() {
                    return "–".to_string();
                }
                let (m, sd) = stat(per_seed, s);
                format!("{m:.1} ± {sd:.1}")
            })
            .collect();
        md += &format!("| {f} | {v} | {} |\n", cells.join(" | "));
        json.push(serde_json::json!({"fraction": f, "variant": v, "per_seed": per_seed}));
    }
    std::fs::write(a.out.join("results.md"), &md)?;
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    // Chart: groups = fraction x split, one bar per variant.
    let groups: Vec<String> = a
        .fractions
        .iter()
        .flat_map(|f| splits.iter().map(move |s| format!("{:.0}% {s}", f * 100.0)))
        .collect();
    let colors = [draw::GREY, draw::BLUE, draw::ORANGE, draw::GREEN, draw::RED];
    let series: Vec<Bars> = a
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| Bars {
            name: v.clone(),
            color: colors[i % colors.len()],
            values: a
                .fractions
                .iter()
                .flat_map(|f| {
                    let per_seed = rows
                        .iter()
                        .find(|r| r.0 == *f && &r.1 == v)
                        .map(|r| r.2.clone())
                        .unwrap_or_default();
                    splits
                        .iter()
                        .map(move |s| stat(&per_seed, s))
                        .collect::<Vec<_>>()
                })
                .collect(),
        })
        .collect();
    let title = match a.recipe {
        Recipe::Distill => "distillation ablation: Acc@0.5 (%), mean +- std over seeds",
        Recipe::Qrnet => "QRNet ablation: Acc@0.5 (%), mean +- std over seeds",
        Recipe::Ckd => "weakly supervised CKD vs supervised: Acc@0.5 / R@k (%), mean +- std",
    };
    draw::bar_chart(title, &groups, &series, 160 + 70 * groups.len() as u32, 320)
        .save(a.out.join("ablation.png"))?;
    println!("{md}");
    eprintln!(
        "wrote {}, results.json and ablation.png",
        a.out.join("results.md").display()
    );
    Ok(())
}
