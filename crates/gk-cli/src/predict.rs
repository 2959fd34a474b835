//! `groundkit predict`: one image and expression (JSON on stdout, a picture), or many
//! (`--input FILE.jsonl | DIR`, [`gk_train::batch_predict`]): batched, with a progress bar,
//! one line per expression in `--out`, resumable.

use anyhow::{bail, Context, Result};
use gk_train::batch_predict::{self, Input};
use gk_train::run::RunDir;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// One image file (with one --expr).
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    pub image: Option<PathBuf>,
    /// Many queries: a JSONL file of {"id", "image", "expr", "bbox_xyxy"?} rows, or a folder
    /// whose every PNG/JPEG is grounded with each --expr.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// The referring expression (with --input DIR: repeat it for several per image).
    #[arg(long)]
    pub expr: Vec<String>,
    /// One image: the picture (default IMAGE stem + `.grounded.png`). Many: the predictions
    /// JSONL (required); an existing one is continued, not redone.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Folder the rows' image paths are relative to (default: the JSONL's folder).
    #[arg(long, requires = "input")]
    pub images: Option<PathBuf>,
    /// Queries per forward.
    #[arg(long, default_value_t = 8, requires = "input")]
    pub batch: usize,
    /// Also draw a picture of each answer into this folder.
    #[arg(long, requires = "input")]
    pub pictures: Option<PathBuf>,
}

pub fn run(a: PredictArgs) -> Result<()> {
    let run = RunDir::open(&a.run)?;
    let model = gk_train::infer::open(&run)
        .with_context(|| format!("loading the run {}", a.run.display()))?;
    match (&a.image, &a.input) {
        (Some(image), None) => one(&*model, image, &a),
        (None, Some(input)) => many(&*model, input, &a),
        _ => bail!("give --image (one query) or --input (many)"),
    }
}

fn one(
    model: &dyn gk_train::infer::GroundingModel,
    image: &std::path::Path,
    a: &PredictArgs,
) -> Result<()> {
    let [expr] = a.expr.as_slice() else {
        bail!("--image takes exactly one --expr (got {})", a.expr.len());
    };
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}.grounded.png",
            image
                .file_stem()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default()
        ))
    });
    let img = gk_data::image_io::load_rgb(image)?;
    let query = gk_train::infer::Query { image: &img, expr };
    let g = model
        .ground(&[query])
        .with_context(|| format!("grounding {expr:?}"))?
        .remove(0);
    let mut caption = vec![format!("\"{expr}\"")];
    if let Some(p) = &g.phrase {
        caption.push(format!("phrase \"{p}\""));
    }
    gk_train::draw::annotate(&img, g.bbox_xyxy, None, &caption, 256)
        .save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    let mut answer = serde_json::json!({"image": image, "expr": expr, "picture": out});
    if let (Some(o), serde_json::Value::Object(g)) =
        (answer.as_object_mut(), serde_json::to_value(&g)?)
    {
        o.extend(g);
    }
    println!("{answer}");
    Ok(())
}

fn many(
    model: &dyn gk_train::infer::GroundingModel,
    input: &std::path::Path,
    a: &PredictArgs,
) -> Result<()> {
    let Some(out) = &a.out else {
        bail!("--input needs --out PRED.jsonl (where the predictions go)");
    };
    let input = if input.is_dir() {
        Input::Folder {
            dir: input.to_path_buf(),
            exprs: a.expr.clone(),
        }
    } else {
        if !a.expr.is_empty() {
            bail!("--expr goes with --image or a folder; a JSONL file carries its own expressions");
        }
        Input::Jsonl(input.to_path_buf())
    };
    let rows = input
        .rows()
        .with_context(|| format!("reading {}", a.input.as_ref().unwrap().display()))?;
    if let Some(why) = &model.info().batch_dependent {
        eprintln!(
            "note: {why}: answers depend on the batch of {} and the input's order",
            a.batch
        );
    }
    let opts = batch_predict::Options {
        batch: a.batch,
        image_root: a.images.clone().unwrap_or_else(|| input.default_root()),
        pictures: a.pictures.clone(),
    };
    let pb = indicatif::ProgressBar::new(rows.len() as u64).with_message("predict");
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec}",
    )?);
    // the bar counts this run's rows: those already written (the first call's count) are not
    let mut base = None;
    let s = batch_predict::run(model, &rows, out, &opts, |done, total| {
        let b = *base.get_or_insert_with(|| {
            pb.set_length((total - done) as u64);
            if done > 0 {
                pb.set_message(format!("predict ({done} already done)"));
            }
            done
        });
        pb.set_position((done - b) as u64)
    })
    .with_context(|| format!("predicting into {}", out.display()))?;
    pb.finish_and_clear();
    let mut line = format!(
        "{} rows: {} predicted, {} already in {}, {} bad; {:.1} rows/s",
        s.rows,
        s.predicted,
        s.already_done,
        out.display(),
        s.bad,
        s.rows_per_second
    );
    if let (Some(acc), Some(miou)) = (s.acc50, s.miou) {
        line += &format!(
            "; {} with boxes: Acc@0.5 {acc:.2}%, mIoU {miou:.2}%",
            s.scored
        );
    }
    eprintln!("{line}");
    for e in &s.bad_examples {
        eprintln!("  bad: {e}");
    }
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
