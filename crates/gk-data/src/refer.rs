//! The original `refer` API layout (lichengunc/refer): `refs(<split_by>).p`, a pickled
//! list of refs, beside a COCO-style `instances.json`. One canonical record per sentence,
//! in the refs' order; the box is the annotation's COCO xywh box.
//!
//! `ref["file_name"]` is a derived name (`..._16.jpg`) that names no real file, so the
//! image comes from `instances.json` (`shared/data.md` §1.4).

use crate::dataset::Skipped;
use crate::error::{DataError, Result};
use crate::pickle::{self, Value};
use crate::published::{to_xyxy, Converted, SourceFile};
use crate::record::Record;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a `refer` folder holds for one `split_by`.
#[derive(Debug, Clone)]
pub struct ReferSource {
    /// `refcoco`, `refcoco+`, `refcocog` or `refclef`.
    pub dataset: String,
    pub split_by: String,
    pub refs: PathBuf,
    pub instances: PathBuf,
}

impl ReferSource {
    /// `dir` is `data/<dataset>` of the refer layout; the dataset name is the folder name.
    pub fn in_dir(dir: &Path, split_by: &str) -> Self {
        let dataset = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            dataset,
            split_by: split_by.to_string(),
            refs: dir.join(format!("refs({split_by}).p")),
            instances: dir.join("instances.json"),
        }
    }

    fn image_root(&self) -> &'static str {
        if self.dataset == "refclef" {
            "referit/images"
        } else {
            "coco/train2014"
        }
    }
}

struct Image {
    file: String,
    width: Option<u32>,
    height: Option<u32>,
}

fn json_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

type Instances = (HashMap<i64, Image>, HashMap<i64, [f64; 4]>);

fn load_instances(path: &Path, text: &str) -> Result<Instances> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| json_err(path, format!("not JSON: {e}")))?;
    let list = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_array())
            .ok_or_else(|| json_err(path, format!("no `{k}` list: not a COCO instances file")))
    };
    let mut images = HashMap::new();
    for (i, im) in list("images")?.iter().enumerate() {
        let id = im
            .get("id")
            .and_then(|x| x.as_i64())
            .ok_or_else(|| json_err(path, format!("images[{i}] has no integer id")))?;
        let file = im
            .get("file_name")
            .and_then(|x| x.as_str())
            .ok_or_else(|| json_err(path, format!("images[{i}] has no file_name")))?;
        let dim = |k: &str| {
            im.get(k)
                .and_then(|x| x.as_u64())
                .and_then(|d| u32::try_from(d).ok())
        };
        images.insert(
            id,
            Image {
                file: file.to_string(),
                width: dim("width"),
                height: dim("height"),
            },
        );
    }
    let mut anns = HashMap::new();
    for (i, a) in list("annotations")?.iter().enumerate() {
        let id = a
            .get("id")
            .and_then(|x| x.as_i64())
            .ok_or_else(|| json_err(path, format!("annotations[{i}] has no integer id")))?;
        let nums: Option<Vec<f64>> = a
            .get("bbox")
            .and_then(|b| b.as_array())
            .map(|b| b.iter().filter_map(|x| x.as_f64()).collect());
        let bbox: [f64; 4] = nums.and_then(|n| n.try_into().ok()).ok_or_else(|| {
            json_err(
                path,
                format!("annotations[{i}] (id {id}) has no 4-number bbox"),
            )
        })?;
        anns.insert(id, bbox);
    }
    Ok((images, anns))
}

/// Read one `split_by` of a refer folder; `split` keeps only that split (`None`: all).
pub fn read(src: &ReferSource, split: Option<&str>, skip_bad: bool) -> Result<Converted> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| DataError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let instances = read(&src.instances)?;
    let text =
        std::str::from_utf8(&instances).map_err(|_| json_err(&src.instances, "not UTF-8 text"))?;
    let (images, anns) = load_instances(&src.instances, text)?;
    let bytes = read(&src.refs)?;
    let refs = pickle::loads(&bytes).map_err(|e| json_err(&src.refs, e.to_string()))?;
    let Some(refs) = refs.as_seq() else {
        return Err(json_err(
            &src.refs,
            format!("holds a {}, not a list of refs", refs.type_name()),
        ));
    };
    let mut out = Converted {
        sources: vec![
            SourceFile::of(&src.refs, &bytes),
            SourceFile::of(&src.instances, &instances),
        ],
        ..Converted::default()
    };
    for (i, r) in refs.iter().enumerate() {
        let rows = match ref_records(src, r, &images, &anns, split) {
            Ok(rows) => rows,
            Err(msg) if skip_bad => {
                out.skipped.push(Skipped {
                    line: i,
                    reason: msg,
                });
                continue;
            }
            Err(msg) => {
                return Err(DataError::Row {
                    path: src.refs.clone(),
                    row: i,
                    msg,
                })
            }
        };
        out.records.extend(rows);
    }
    Ok(out)
}

fn ref_records(
    src: &ReferSource,
    r: &Value,
    images: &HashMap<i64, Image>,
    anns: &HashMap<i64, [f64; 4]>,
    want: Option<&str>,
) -> std::result::Result<Vec<Record>, String> {
    let int = |k: &str| match r.get(k) {
        Some(Value::Int(i)) => Ok(*i),
        Some(v) => Err(format!("`{k}` is a {}, not an integer", v.type_name())),
        None => Err(format!("has no `{k}`")),
    };
    let split = r
        .get("split")
        .and_then(Value::as_str)
        .ok_or("has no `split` string")?;
    if want.is_some_and(|w| w != split) {
        return Ok(Vec::new());
    }
    let (ref_id, ann_id, image_id) = (int("ref_id")?, int("ann_id")?, int("image_id")?);
    let category_id = int("category_id").ok();
    let image = images
        .get(&image_id)
        .ok_or_else(|| format!("image_id {image_id} is not in instances.json"))?;
    let ann = anns
        .get(&ann_id)
        .ok_or_else(|| format!("ann_id {ann_id} is not in instances.json"))?;
    let raw = *ann;
    let xyxy = to_xyxy(raw, true).map_err(|e| format!("ann_id {ann_id}: {e}"))?;
    let sentences = r
        .get("sentences")
        .and_then(Value::as_seq)
        .ok_or("has no `sentences` list")?;
    let mut out = Vec::with_capacity(sentences.len());
    for (k, s) in sentences.iter().enumerate() {
        let sent = s
            .get("sent")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("sentence {k} has no `sent` text"))?;
        if sent.trim().is_empty() {
            return Err(format!("sentence {k} is empty"));
        }
        let sent_id = match s.get("sent_id") {
            Some(Value::Int(i)) => *i,
            _ => return Err(format!("sentence {k} has no integer `sent_id`")),
        };
        let mut extra = serde_json::Map::new();
        extra.insert("image_id".into(), image_id.into());
        extra.insert("ann_id".into(), ann_id.into());
        extra.insert("ref_id".into(), ref_id.into());
        extra.insert("sent_id".into(), sent_id.into());
        if let Some(c) = category_id {
            extra.insert("category_id".into(), c.into());
        }
        extra.insert("bbox_raw".into(), serde_json::json!(raw));
        out.push(Record {
            id: format!("{}_{}/{split}/{sent_id}", src.dataset, src.split_by),
            dataset: src.dataset.clone(),
            split_by: Some(src.split_by.clone()),
            split: split.to_string(),
            image: format!("{}/{}", src.image_root(), image.file),
            width: image.width,
            height: image.height,
            bbox_xyxy: xyxy.map(|c| c as f32),
            bbox_src: "xywh".to_string(),
            expr: sent.to_string(),
            extra,
        });
    }
    Ok(out)
}
