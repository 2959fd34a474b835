//! Shared reporting for `eval` and `demo`: evaluating a run on several sets, the
//! per-split and per-type table, and pictures of right and wrong predictions.

use anyhow::{Context, Result};
use gk_train::draw;
use gk_train::eval::{EvalReport, GtBoxes};
use gk_train::infer::GroundingModel;
use gk_train::run::RunDir;
use gk_train::train::{load_set_with, DataConfig};
use std::path::{Path, PathBuf};

/// Split name of a JSONL path (`.../testA.jsonl` -> `testA`).
pub fn split_name(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Where a split goes in the papers' tables (val, testA, testB, test; others after, in
/// the order given): the key sorts set names such as `unc_testA`.
pub fn paper_column(name: &str) -> usize {
    ["val", "testA", "testB", "test"]
        .iter()
        .position(|s| name == *s || name.ends_with(&format!("_{s}")))
        .unwrap_or(4)
}

/// Evaluates `model` on each set (loaded with the run's data options, `image_root` replaced
/// when given), with a progress bar.
pub fn evaluate_sets(
    model: &dyn GroundingModel,
    data: &DataConfig,
    sets: &[PathBuf],
    gt: GtBoxes,
    batch: usize,
) -> Result<Vec<(String, EvalReport)>> {
    let mut out = Vec::new();
    for path in sets {
        let ds =
            load_set_with(data, path).with_context(|| format!("loading {}", path.display()))?;
        let pb = indicatif::ProgressBar::new(ds.len() as u64)
            .with_message(format!("eval {}", split_name(path)));
        pb.set_style(indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec}",
        )?);
        let report = gk_train::infer::evaluate(model, &ds, gt, batch, |n| pb.inc(n as u64))
            .with_context(|| format!("evaluating {}", path.display()))?;
        pb.finish_and_clear();
        out.push((split_name(path), report));
    }
    Ok(out)
}

/// Queries per forward in `eval` (the training-time evaluation batches at least 16 too).
pub const EVAL_BATCH: usize = 16;

/// A run's own evaluation sets: val, then the test sets.
pub fn run_sets(data: &DataConfig) -> Vec<PathBuf> {
    std::iter::once(data.val.clone())
        .chain(data.test.clone())
        .collect()
}

/// A plain-text table: one row per split (and per expression type under it).
pub fn table(reports: &[(String, EvalReport)]) -> String {
    let mut s = format!(
        "{:<22} {:>6} {:>8} {:>8} {:>8} {:>10}\n",
        "split / type", "n", "Acc@0.5", "Acc@0.75", "mIoU", "Acc@0.5*"
    );
    let row = |name: &str, t: &gk_train::eval::Tally| {
        format!(
            "{:<22} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>10.2}\n",
            name,
            t.n,
            t.acc50(),
            t.acc75(),
            t.miou(),
            t.acc50_frame()
        )
    };
    for (name, r) in reports {
        s += &row(name, &r.all);
        for (k, v) in &r.extra {
            s += &format!("  {k}: {v}\n");
        }
        if r.by_type.len() > 1 {
            for (ty, t) in &r.by_type {
                s += &row(&format!("  {ty}"), t);
            }
        }
    }
    s += "Acc@0.5* = TransVG's protocol: IoU in the padded normalised frame.\n";
    s
}

/// Writes `out` with up to `n` right and `n` wrong predictions of `report` on `set`.
pub fn prediction_sheet(
    data: &DataConfig,
    set: &Path,
    report: &EvalReport,
    n: usize,
    out: &Path,
) -> Result<()> {
    let ds = load_set_with(data, set)?;
    prediction_sheet_of(&ds, report, n, out)
}

/// [`prediction_sheet`] for the records of `ds`.
pub fn prediction_sheet_of(
    ds: &gk_data::dataset::Dataset,
    report: &EvalReport,
    n: usize,
    out: &Path,
) -> Result<()> {
    let right = report.predictions.iter().filter(|p| p.iou >= 0.5).take(n);
    let wrong = report.predictions.iter().filter(|p| p.iou < 0.5).take(n);
    let mut tiles = Vec::new();
    for p in right.chain(wrong) {
        let rec = &ds.records[p.index];
        let sample = ds.get(p.index)?;
        let verdict = if p.iou >= 0.5 { "RIGHT" } else { "WRONG" };
        let ty = ds
            .expr_type(p.index)
            .map(|t| format!(" [{t}]"))
            .unwrap_or_default();
        let caption = vec![
            format!("\"{}\"", rec.expr),
            format!("{verdict} IoU {:.2}{ty}", p.iou),
        ];
        tiles.push(draw::annotate(
            &sample.image,
            p.pred_px,
            Some(rec.bbox_xyxy),
            &caption,
            192,
        ));
    }
    if tiles.is_empty() {
        return Ok(());
    }
    draw::grid(&tiles, 4)
        .save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Loss and accuracy curves from a run's `metrics.jsonl`.
pub fn curves(run: &RunDir, out: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(run.file("metrics.jsonl")).context("reading metrics.jsonl")?;
    let (mut loss, mut l1, mut giou, mut acc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        match v["event"].as_str() {
            Some("train") => {
                loss.push((step, v["loss"].as_f64().unwrap_or(f64::NAN)));
                l1.push((step, v["l1"].as_f64().unwrap_or(f64::NAN)));
                giou.push((step, v["giou"].as_f64().unwrap_or(f64::NAN)));
            }
            Some("eval") => acc.push((step, v["val"]["all"]["acc50"].as_f64().unwrap_or(f64::NAN))),
            _ => {}
        }
    }
    let s = |name: &str, color, points| draw::Series {
        name: name.into(),
        color,
        points,
    };
    let a = draw::line_chart(
        "training loss",
        "step",
        &[
            s("total", draw::BLUE, loss),
            s("l1", draw::ORANGE, l1),
            s("1-giou", draw::GREEN, giou),
        ],
        480,
        260,
    );
    let b = draw::line_chart(
        "val Acc@0.5 (%)",
        "step",
        &[s("val", draw::RED, acc)],
        480,
        260,
    );
    draw::grid(&[a, b], 2)
        .save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
