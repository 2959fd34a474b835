//! Prediction over many queries (`groundkit predict --input`): rows from a JSONL file or
//! a folder of images, batched forwards through [`GroundingModel`], one JSON line per row
//! written as each batch finishes.
//!
//! - A row is `{"id"?, "image", "expr" | "expression" | "sentence", "bbox_xyxy"?}` (our
//!   canonical records fit); a folder gives every PNG/JPEG in it, under it, with each
//!   expression given. Ids are the row's own, else `line N`; they must be unique.
//! - Output lines: `{"id", "image", "expr", "bbox_xyxy", "truncated", "score"?,
//!   "phrase"?, "iou"?}`, or `{"id", "image", "expr", "error"}` for a bad row (missing or
//!   corrupt image, empty expression, unreadable line), which is counted and skipped.
//! - Re-running on the same output continues: ids already written are not predicted again,
//!   and a last line cut by an interruption is removed first, so no line is duplicated.
//! - Rows with a ground-truth box get their pixel IoU (the box clipped to the image, as
//!   `eval` scores it); the summary's Acc@0.5 and mIoU cover every such row in the file.

use crate::error::{io_err, Result, TrainError};
use crate::infer::{Answer, GroundingModel, Query};
use gk_box::Box4;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One query to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    /// As given: relative to the image root, or absolute.
    pub image: String,
    pub expr: String,
    /// Pixel `xyxy` ground truth, if the row has one.
    pub gt_xyxy: Option<Box4>,
    /// Why the row cannot be answered (an unreadable input line).
    pub error: Option<String>,
}

/// Where rows come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A JSONL file of rows.
    Jsonl(PathBuf),
    /// Every image under a folder, each with every expression.
    Folder { dir: PathBuf, exprs: Vec<String> },
}

impl Input {
    /// The folder image paths are relative to when none is given: the JSONL's own folder,
    /// or the image folder.
    pub fn default_root(&self) -> PathBuf {
        match self {
            Input::Jsonl(p) => p.parent().unwrap_or(Path::new(".")).to_path_buf(),
            Input::Folder { dir, .. } => dir.clone(),
        }
    }

    /// The rows, in input order. Duplicate ids are an error (a re-run finds its place by
    /// id); an unreadable line is a row with an error, not a failure.
    pub fn rows(&self) -> Result<Vec<Row>> {
        let rows = match self {
            Input::Jsonl(path) => jsonl_rows(path)?,
            Input::Folder { dir, exprs } => folder_rows(dir, exprs)?,
        };
        let mut seen = HashSet::new();
        for r in &rows {
            if !seen.insert(r.id.as_str()) {
                return Err(TrainError::Config(format!(
                    "the id {:?} appears twice in the input; ids must be unique",
                    r.id
                )));
            }
        }
        Ok(rows)
    }
}

fn jsonl_rows(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let id = format!("line {}", i + 1);
        rows.push(parse_row(line, &id).unwrap_or_else(|e| Row {
            id,
            image: String::new(),
            expr: String::new(),
            gt_xyxy: None,
            error: Some(format!("{}:{}: {e}", path.display(), i + 1)),
        }));
    }
    Ok(rows)
}

/// One JSONL row; `line_id` when it has no `"id"`.
fn parse_row(line: &str, line_id: &str) -> std::result::Result<Row, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let string = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| obj.get(*k))
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                other => Err(format!("{:?} is {other}, not a string", keys[0])),
            })
            .transpose()
    };
    let image = string(&["image"])?.ok_or("no \"image\"")?;
    let expr = string(&["expr", "expression", "sentence"])?.ok_or("no \"expr\"")?;
    let gt_xyxy = match obj.get("bbox_xyxy") {
        None | Some(serde_json::Value::Null) => None,
        Some(b) => {
            let b: Box4 =
                serde_json::from_value(b.clone()).map_err(|e| format!("\"bbox_xyxy\": {e}"))?;
            Some(gk_box::check_xyxy(b).map_err(|e| format!("\"bbox_xyxy\": {e}"))?)
        }
    };
    Ok(Row {
        id: string(&["id"])?.unwrap_or_else(|| line_id.to_string()),
        image,
        expr,
        gt_xyxy,
        error: None,
    })
}

fn folder_rows(dir: &Path, exprs: &[String]) -> Result<Vec<Row>> {
    if exprs.is_empty() {
        return Err(TrainError::Config(
            "a folder of images needs at least one expression (--expr)".into(),
        ));
    }
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let p = entry.map_err(io_err(&d))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
            {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut rows = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(dir)
            .unwrap_or(&f)
            .to_string_lossy()
            .into_owned();
        for (k, e) in exprs.iter().enumerate() {
            rows.push(Row {
                id: if exprs.len() == 1 {
                    rel.clone()
                } else {
                    format!("{rel}#{k}")
                },
                image: rel.clone(),
                expr: e.clone(),
                gt_xyxy: None,
                error: None,
            });
        }
    }
    Ok(rows)
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Queries per forward.
    pub batch: usize,
    /// What row image paths are relative to.
    pub image_root: PathBuf,
    /// Write a picture per answered row here (`<id>.png`, the id made file-safe).
    pub pictures: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub rows: usize,
    /// Rows found already written (a continued run).
    pub already_done: usize,
    /// Rows answered by this run.
    pub predicted: usize,
    /// Rows written with an error by this run.
    pub bad: usize,
    /// The first few bad rows' errors.
    pub bad_examples: Vec<String>,
    /// Rows of the whole output with a ground-truth box, and their accuracy.
    pub scored: usize,
    pub acc50: Option<f64>,
    pub miou: Option<f64>,
    pub seconds: f64,
    /// Rows answered per second by this run.
    pub rows_per_second: f64,
}

#[derive(Serialize)]
struct Line<'a> {
    id: &'a str,
    image: &'a str,
    expr: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    bbox_xyxy: Option<Box4>,
    #[serde(skip_serializing_if = "Option::is_none")]
    truncated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phrase: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iou: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// The ids already in `out`, after cutting an incomplete last line (an interrupted write)
/// off the file. A complete line that is not JSON with an `"id"` is an error: the file is
/// not one of ours.
fn resume_point(out: &Path) -> Result<HashSet<String>> {
    let mut done = HashSet::new();
    let bytes = match std::fs::read(out) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(io_err(out)(e)),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    for (i, line) in bytes[..complete].lines().enumerate() {
        let line = line.map_err(io_err(out))?;
        let id = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_string))
            .ok_or_else(|| TrainError::Format {
                path: out.to_path_buf(),
                msg: format!(
                    "line {} is not a prediction line; refusing to continue this file",
                    i + 1
                ),
            })?;
        done.insert(id);
    }
    if complete < bytes.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(io_err(out))?;
        f.set_len(complete as u64).map_err(io_err(out))?;
    }
    Ok(done)
}

fn file_safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Answers every row of `rows` not yet in `out`, appending a line per row as each batch
/// finishes; `on_batch(done, total)` after each. A batch whose forward fails is answered
/// row by row so one bad row does not take the others with it.
pub fn run(
    model: &dyn GroundingModel,
    rows: &[Row],
    out: &Path,
    opts: &Options,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<Summary> {
    let start = Instant::now();
    let done = resume_point(out)?;
    if let Some(dir) = &opts.pictures {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let todo: Vec<&Row> = rows.iter().filter(|r| !done.contains(&r.id)).collect();
    let mut summary = Summary {
        rows: rows.len(),
        already_done: rows.len() - todo.len(),
        ..Default::default()
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(io_err(out))?;
    let mut w = std::io::BufWriter::new(file);
    let mut progress = summary.already_done;
    on_batch(progress, rows.len());
    for chunk in todo.chunks(opts.batch.max(1)) {
        // decode in parallel; a row that cannot be read becomes its error line
        let images: Vec<std::result::Result<image::RgbImage, String>> = chunk
            .par_iter()
            .map(|r| {
                if let Some(e) = &r.error {
                    return Err(e.clone());
                }
                if r.expr.trim().is_empty() {
                    return Err("the expression is empty".into());
                }
                let p = gk_data::dataset::resolve_image(&opts.image_root, &r.image);
                gk_data::image_io::load_rgb(&p).map_err(|e| e.to_string())
            })
            .collect();
        let good: Vec<usize> = (0..chunk.len()).filter(|&i| images[i].is_ok()).collect();
        let queries: Vec<Query> = good
            .iter()
            .map(|&i| Query {
                image: images[i].as_ref().unwrap(),
                expr: &chunk[i].expr,
            })
            .collect();
        let mut answers: Vec<std::result::Result<Answer, String>> = match model.ground(&queries) {
            Ok(a) if a.len() == queries.len() => a.into_iter().map(Ok).collect(),
            // one by one: a row the model cannot read (its data) is that row's error;
            // anything else stops the run
            _ => queries
                .iter()
                .map(|q| match model.ground(std::slice::from_ref(q)) {
                    Ok(mut a) if a.len() == 1 => Ok(Ok(a.remove(0))),
                    Ok(_) => Err(TrainError::Config("the model gave no answer".into())),
                    Err(e @ TrainError::Data(_)) => Ok(Err(e.to_string())),
                    Err(e) => Err(e),
                })
                .collect::<Result<Vec<_>>>()?,
        }
        .into_iter()
        .rev()
        .collect();
        for (i, row) in chunk.iter().enumerate() {
            let answer = match &images[i] {
                Err(e) => Err(e.clone()),
                Ok(_) => answers.pop().unwrap(),
            };
            let line = match &answer {
                Ok(a) => {
                    let iou = match row.gt_xyxy {
                        Some(gt) => Some(gk_box::iou(a.bbox_xyxy, gt)?),
                        None => None,
                    };
                    if let Some(dir) = &opts.pictures {
                        let mut caption = vec![format!("\"{}\"", row.expr)];
                        if let Some(iou) = iou {
                            caption.push(format!("IoU {iou:.2}"));
                        }
                        let p = dir.join(format!("{}.png", file_safe(&row.id)));
                        crate::draw::annotate(
                            images[i].as_ref().unwrap(),
                            a.bbox_xyxy,
                            row.gt_xyxy,
                            &caption,
                            256,
                        )
                        .save(&p)
                        .map_err(|e| TrainError::Format {
                            path: p.clone(),
                            msg: e.to_string(),
                        })?;
                    }
                    summary.predicted += 1;
                    Line {
                        id: &row.id,
                        image: &row.image,
                        expr: &row.expr,
                        bbox_xyxy: Some(a.bbox_xyxy),
                        truncated: Some(a.truncated),
                        score: a.score,
                        phrase: a.phrase.as_deref(),
                        iou,
                        error: None,
                    }
                }
                Err(e) => {
                    summary.bad += 1;
                    if summary.bad_examples.len() < 5 {
                        summary.bad_examples.push(format!("{}: {e}", row.id));
                    }
                    Line {
                        id: &row.id,
                        image: &row.image,
                        expr: &row.expr,
                        bbox_xyxy: None,
                        truncated: None,
                        score: None,
                        phrase: None,
                        iou: None,
                        error: Some(e),
                    }
                }
            };
            serde_json::to_writer(&mut w, &line).map_err(|e| TrainError::Format {
                path: out.to_path_buf(),
                msg: e.to_string(),
            })?;
            w.write_all(b"\n").map_err(io_err(out))?;
        }
        // a batch's lines reach the file before the next batch starts
        w.flush().map_err(io_err(out))?;
        progress += chunk.len();
        on_batch(progress, rows.len());
    }
    drop(w);
    summary.seconds = start.elapsed().as_secs_f64();
    summary.rows_per_second = (summary.predicted + summary.bad) as f64 / summary.seconds.max(1e-9);
    score_file(out, rows, &mut summary)?;
    Ok(summary)
}

/// Acc@0.5 and mIoU over the lines of `out` for `rows` that carry an IoU.
fn score_file(out: &Path, rows: &[Row], summary: &mut Summary) -> Result<()> {
    let ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let text = std::fs::read_to_string(out).map_err(io_err(out))?;
    let (mut n, mut hits, mut sum) = (0usize, 0usize, 0f64);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(id), Some(iou)) = (v["id"].as_str(), v["iou"].as_f64()) else {
            continue;
        };
        if ids.contains(id) {
            n += 1;
            hits += (iou >= 0.5) as usize;
            sum += iou;
        }
    }
    summary.scored = n;
    if n > 0 {
        summary.acc50 = Some(100.0 * hits as f64 / n as f64);
        summary.miou = Some(100.0 * sum / n as f64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_parse_aliases_ids_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"id\": 7, \"image\": \"a.png\", \"expression\": \"the cat\", \"bbox_xyxy\": [1, 2, 3, 4]}\n\
             \n\
             {\"image\": \"b.png\", \"sentence\": \"a dog\"}\n\
             not json\n\
             {\"image\": \"c.png\", \"expr\": \"x\", \"bbox_xyxy\": [5, 5, 1, 1]}\n",
        )
        .unwrap();
        let rows = Input::Jsonl(p.clone()).rows().unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            (rows[0].id.as_str(), rows[0].expr.as_str(), rows[0].gt_xyxy),
            ("7", "the cat", Some([1.0, 2.0, 3.0, 4.0]))
        );
        assert_eq!(
            (rows[1].id.as_str(), rows[1].error.as_deref()),
            ("line 3", None)
        );
        assert_eq!(rows[2].id, "line 4");
        assert!(rows[2].error.as_deref().unwrap().contains("q.jsonl:4"));
        assert!(
            rows[3].error.as_deref().unwrap().contains("bbox_xyxy"),
            "{rows:?}"
        );
        std::fs::write(&p, "{\"id\":1,\"image\":\"a\",\"expr\":\"x\"}\n{\"id\":\"1\",\"image\":\"b\",\"expr\":\"y\"}\n").unwrap();
        let e = Input::Jsonl(p).rows().unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn folders_give_every_image_with_every_expression() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for f in ["b.png", "a.JPG", "sub/c.jpeg", "notes.txt"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let input = Input::Folder {
            dir: dir.path().to_path_buf(),
            exprs: vec!["left".into(), "right".into()],
        };
        let ids: Vec<String> = input.rows().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(
            ids,
            [
                "a.JPG#0",
                "a.JPG#1",
                "b.png#0",
                "b.png#1",
                "sub/c.jpeg#0",
                "sub/c.jpeg#1"
            ]
        );
        let none = Input::Folder {
            dir: dir.path().to_path_buf(),
            exprs: vec![],
        };
        assert!(none.rows().is_err());
    }

    #[test]
    fn resume_cuts_a_partial_last_line_and_refuses_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.jsonl");
        std::fs::write(&out, "{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"c\",\"bb").unwrap();
        let done = resume_point(&out).unwrap();
        assert_eq!(done, ["a", "b"].into_iter().map(String::from).collect());
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n"
        );
        std::fs::write(&out, "hello\n").unwrap();
        assert!(resume_point(&out)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }
}
