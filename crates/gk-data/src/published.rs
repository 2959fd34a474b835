//! The published grounding benchmarks: their dataset keys, their TransVG/HiVG/CLIP-VG
//! `.pth` split lists, and the conversion of those rows to canonical [`Record`]s.
//!
//! Row layouts (`shared/data.md` §1.1-1.2), told apart per row:
//! - flickr: `(image, box, phrase)`;
//! - every other key: `(image, e1, box, phrase, e4)`, where `e1` is a mask file name
//!   (TransVG), an image-size dict (HiVG) or, in HiVG's `mixup`, the source string
//!   `"flickr"`/`"referit"`; `e4` is TransVG's parse slots or HiVG's segmentation.
//!
//! Boxes are COCO xywh for the RefCOCO family and xyxy for ReferIt and Flickr, except in
//! `mixup`, where HiVG's loader reads every row as xywh (it tests the dataset name, which is
//! `mixup`, not the row's source); they may be lists, tuples or numpy arrays. The stored numbers are kept as `extra.bbox_raw` so that
//! evaluation can redo TransVG's integer truncation exactly. Image paths get the logical
//! roots `coco/train2014/`, `referit/images/`, `flickr30k/images/`.

use crate::dataset::Skipped;
use crate::error::{DataError, Result};
use crate::pickle::Value;
use crate::record::Record;
use std::path::Path;

/// A TransVG dataset key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKey {
    Unc,
    UncPlus,
    Gref,
    GrefUmd,
    Referit,
    Flickr,
    /// HiVG's merged training set (RefCOCO/+/g-umd, ReferIt, Flickr).
    Mixup,
}

/// Where a row's image and box convention come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Coco,
    Referit,
    Flickr,
}

impl Source {
    /// The logical image root that canonical paths start with.
    pub fn image_root(self) -> &'static str {
        match self {
            Source::Coco => "coco/train2014",
            Source::Referit => "referit/images",
            Source::Flickr => "flickr30k/images",
        }
    }

    /// COCO boxes are xywh; ReferIt and Flickr boxes xyxy.
    pub fn xywh(self) -> bool {
        self == Source::Coco
    }
}

impl DatasetKey {
    pub const ALL: [DatasetKey; 7] = [
        DatasetKey::Unc,
        DatasetKey::UncPlus,
        DatasetKey::Gref,
        DatasetKey::GrefUmd,
        DatasetKey::Referit,
        DatasetKey::Flickr,
        DatasetKey::Mixup,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.key() == s)
    }

    /// The key as TransVG spells it (folder and file prefix).
    pub fn key(self) -> &'static str {
        match self {
            DatasetKey::Unc => "unc",
            DatasetKey::UncPlus => "unc+",
            DatasetKey::Gref => "gref",
            DatasetKey::GrefUmd => "gref_umd",
            DatasetKey::Referit => "referit",
            DatasetKey::Flickr => "flickr",
            DatasetKey::Mixup => "mixup",
        }
    }

    /// The dataset name in canonical records.
    pub fn dataset(self) -> &'static str {
        match self {
            DatasetKey::Unc => "refcoco",
            DatasetKey::UncPlus => "refcoco+",
            DatasetKey::Gref | DatasetKey::GrefUmd => "refcocog",
            DatasetKey::Referit => "referit",
            DatasetKey::Flickr => "flickr30k",
            DatasetKey::Mixup => "mixup",
        }
    }

    /// How the split was made (the `refer` API's `split_by`).
    pub fn split_by(self) -> Option<&'static str> {
        match self {
            DatasetKey::Unc | DatasetKey::UncPlus => Some("unc"),
            DatasetKey::Gref => Some("google"),
            DatasetKey::GrefUmd => Some("umd"),
            DatasetKey::Referit | DatasetKey::Flickr | DatasetKey::Mixup => None,
        }
    }

    /// The splits TransVG/HiVG publish, in the papers' column order (evaluation splits
    /// after `train`).
    pub fn splits(self) -> &'static [&'static str] {
        match self {
            DatasetKey::Unc | DatasetKey::UncPlus => {
                &["train", "val", "testA", "testB", "trainval"]
            }
            DatasetKey::Gref => &["train", "val"],
            DatasetKey::GrefUmd => &["train", "val", "test"],
            DatasetKey::Referit => &["train", "val", "trainval", "test"],
            DatasetKey::Flickr => &["train", "val", "test"],
            DatasetKey::Mixup => &["train", "val", "test"],
        }
    }

    /// The files that make `split`: `trainval` is train + val except for ReferIt, which
    /// ships its own `referit_trainval.pth` (TransVG's loader).
    pub fn split_files(self, split: &str) -> Vec<String> {
        let parts: Vec<&str> = if split == "trainval" && self != DatasetKey::Referit {
            vec!["train", "val"]
        } else {
            vec![split]
        };
        parts
            .iter()
            .map(|s| format!("{}/{}_{s}.pth", self.key(), self.key()))
            .collect()
    }

    fn default_source(self) -> Source {
        match self {
            DatasetKey::Referit => Source::Referit,
            DatasetKey::Flickr => Source::Flickr,
            _ => Source::Coco,
        }
    }
}

/// A file a conversion read, for its provenance record.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: std::path::PathBuf,
    pub sha256: String,
    pub bytes: usize,
}

impl SourceFile {
    pub fn of(path: &Path, bytes: &[u8]) -> Self {
        Self {
            path: path.to_path_buf(),
            sha256: crate::sha256::hex(bytes),
            bytes: bytes.len(),
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Default)]
pub struct Converted {
    pub records: Vec<Record>,
    /// Rows skipped with `skip_bad` (row index and reason).
    pub skipped: Vec<Skipped>,
    /// The files read (the reader hashes what it already holds in memory).
    pub sources: Vec<SourceFile>,
}

/// Convert a decoded split list to records. `first_row` offsets the ids when several
/// files make one split (`trainval`).
pub fn convert_split_list(
    v: &Value,
    key: DatasetKey,
    split: &str,
    path: &Path,
    skip_bad: bool,
    first_row: usize,
) -> Result<Converted> {
    let Some(rows) = v.as_seq() else {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            msg: format!("holds a {}, not a list of rows", v.type_name()),
        });
    };
    let mut out = Converted::default();
    for (i, row) in rows.iter().enumerate() {
        match convert_row(row, key, split, first_row + i) {
            Ok(r) => out.records.push(r),
            Err(msg) if skip_bad => out.skipped.push(Skipped {
                line: i,
                reason: msg,
            }),
            Err(msg) => {
                return Err(DataError::Row {
                    path: path.to_path_buf(),
                    row: i,
                    msg,
                })
            }
        }
    }
    Ok(out)
}

fn convert_row(
    row: &Value,
    key: DatasetKey,
    split: &str,
    index: usize,
) -> std::result::Result<Record, String> {
    let items = row
        .as_seq()
        .ok_or_else(|| format!("is a {}, not a tuple", row.type_name()))?;
    let mut extra = serde_json::Map::new();
    let (mut width, mut height) = (None, None);
    let (image, bbox, phrase, source) = match (key, items) {
        (DatasetKey::Flickr, [image, bbox, phrase]) => (image, bbox, phrase, Source::Flickr),
        (DatasetKey::Flickr, _) => {
            return Err(format!(
                "has {} items; flickr rows are (image, box, phrase)",
                items.len()
            ))
        }
        (_, [image, e1, bbox, phrase, e4]) => {
            let file = image.as_str().unwrap_or("");
            let source = match e1 {
                Value::Str(s) if key == DatasetKey::Mixup && s == "flickr" => Source::Flickr,
                Value::Str(s) if key == DatasetKey::Mixup && s == "referit" => Source::Referit,
                _ if key == DatasetKey::Mixup && !file.starts_with("COCO_") => {
                    return Err(format!("mixup row: source {:?} is neither \"flickr\" nor \"referit\" and `{file}` is not a COCO image", e1.to_json()))
                }
                _ => key.default_source(),
            };
            match e1 {
                Value::Str(s)
                    if key == DatasetKey::Mixup && matches!(s.as_str(), "flickr" | "referit") =>
                {
                    extra.insert("source".into(), s.clone().into());
                }
                Value::Str(s) => {
                    extra.insert("mask_file".into(), s.clone().into());
                }
                Value::Dict(_) => {
                    // HiVG: {"height", "width"}; its e4 is the segmentation.
                    let dim = |k| {
                        e1.get(k)
                            .and_then(Value::as_f64)
                            .filter(|d| *d > 0.0 && d.fract() == 0.0)
                            .map(|d| d as u32)
                    };
                    width = dim("width");
                    height = dim("height");
                    extra.insert("image_size".into(), e1.to_json());
                }
                Value::None => {}
                other => {
                    extra.insert("e1".into(), other.to_json());
                }
            }
            if *e4 != Value::None {
                let name = if matches!(e1, Value::Dict(_)) {
                    "obj_mask"
                } else {
                    "attri"
                };
                extra.insert(name.into(), e4.to_json());
            }
            (image, bbox, phrase, source)
        }
        _ => {
            return Err(format!(
                "has {} items; {} rows are (image, mask or size, box, phrase, extra)",
                items.len(),
                key.key()
            ))
        }
    };
    let file = image
        .as_str()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| format!("image is a {}, not a file name", image.type_name()))?;
    if file.contains("..") || file.starts_with('/') {
        return Err(format!("image `{file}` is not a plain file name"));
    }
    let expr = phrase
        .as_str()
        .ok_or_else(|| format!("phrase is a {}, not text", phrase.type_name()))?;
    if expr.trim().is_empty() {
        return Err("empty expression".into());
    }
    let xywh = source.xywh() || key == DatasetKey::Mixup;
    let raw = box_numbers(bbox)?;
    let xyxy = to_xyxy(raw, xywh)?;
    extra.insert("bbox_raw".into(), serde_json::json!(raw));
    if key == DatasetKey::Mixup {
        extra.entry("source").or_insert_with(|| "coco".into());
    }
    Ok(Record {
        id: format!("{}/{split}/{index:06}", key.key()),
        dataset: key.dataset().to_string(),
        split_by: key.split_by().map(str::to_string),
        split: split.to_string(),
        image: format!("{}/{file}", source.image_root()),
        width,
        height,
        bbox_xyxy: xyxy.map(|c| c as f32),
        bbox_src: if xywh { "xywh" } else { "xyxy" }.to_string(),
        expr: expr.to_string(),
        extra,
    })
}

/// Four numbers from a list, tuple or numpy array (checked by [`to_xyxy`]).
pub fn box_numbers(v: &Value) -> std::result::Result<[f64; 4], String> {
    let nums: Vec<f64> = match v {
        Value::Array(a) => a.data.clone(),
        _ => match v.as_seq() {
            Some(items) => items
                .iter()
                .map(|x| {
                    x.as_f64()
                        .ok_or_else(|| format!("box holds a {}", x.type_name()))
                })
                .collect::<std::result::Result<_, _>>()?,
            None => return Err(format!("box is a {}, not 4 numbers", v.type_name())),
        },
    };
    nums.as_slice()
        .try_into()
        .map_err(|_| format!("box has {} numbers, not 4", nums.len()))
}

/// A source box to pixel xyxy (x2 = x + w, no +1), rejecting non-finite, negative or
/// empty boxes: the one check of every published box.
pub fn to_xyxy(b: [f64; 4], xywh: bool) -> std::result::Result<[f64; 4], String> {
    if b.iter().any(|c| !c.is_finite()) {
        return Err(format!("box {b:?} is not finite"));
    }
    let xyxy = if xywh {
        [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    } else {
        b
    };
    let what = if xywh { "xywh" } else { "xyxy" };
    if b[0] < 0.0 || b[1] < 0.0 {
        return Err(format!("{what} box {b:?} starts at a negative coordinate"));
    }
    if xyxy[2] <= xyxy[0] || xyxy[3] <= xyxy[1] {
        return Err(format!("{what} box {b:?} has no area"));
    }
    Ok(xyxy)
}

/// TransVG's ground-truth box: `np.array(bbox, dtype=int)` (truncation toward zero), then
/// `x2 = x + w` for xywh sources (`datasets/data_loader.py`, `pull_item`).
pub fn transvg_int_box(raw: [f64; 4], xywh: bool) -> [f64; 4] {
    let t = raw.map(f64::trunc);
    if xywh {
        [t[0], t[1], t[0] + t[2], t[1] + t[3]]
    } else {
        t
    }
}

/// [`transvg_int_box`] of a canonical record, from the source numbers it kept
/// (`extra.bbox_raw`); records without them are rebuilt from `bbox_xyxy` in the source's
/// convention (exact for integer boxes).
pub fn record_int_box(r: &Record) -> gk_box::Box4 {
    let xywh = r.bbox_src == "xywh";
    let raw: Option<[f64; 4]> = r
        .extra
        .get("bbox_raw")
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    let raw = raw.unwrap_or_else(|| {
        let b = r.bbox_xyxy.map(f64::from);
        if xywh {
            [b[0], b[1], b[2] - b[0], b[3] - b[1]]
        } else {
            b
        }
    });
    transvg_int_box(raw, xywh).map(|c| c as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }
    fn nums(v: &[f64]) -> Value {
        Value::List(v.iter().map(|&f| Value::Float(f)).collect())
    }

    #[test]
    fn transvg_row_xywh_to_xyxy_and_int_box() {
        let row = Value::Tuple(vec![
            s("COCO_train2014_000000000839.jpg"),
            s("482127.pth"),
            nums(&[303.58, 69.03, 293.29, 425.79]),
            s("guy on the right"),
            Value::List(vec![]),
        ]);
        let r = convert_row(&row, DatasetKey::Unc, "val", 3).unwrap();
        assert_eq!(r.id, "unc/val/000003");
        assert_eq!(r.image, "coco/train2014/COCO_train2014_000000000839.jpg");
        assert_eq!(r.bbox_src, "xywh");
        assert!((r.bbox_xyxy[2] - 596.87).abs() < 1e-3);
        assert_eq!(r.extra["mask_file"], "482127.pth");
        assert_eq!(
            transvg_int_box([303.58, 69.03, 293.29, 425.79], true),
            [303.0, 69.0, 596.0, 494.0]
        );
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        let row = |b: &[f64]| Value::Tuple(vec![s("a.jpg"), s("m"), nums(b), s("x"), Value::None]);
        assert!(
            convert_row(&row(&[1.0, 2.0, -3.0, 4.0]), DatasetKey::Unc, "val", 0)
                .unwrap_err()
                .contains("no area")
        );
        assert!(
            convert_row(&row(&[-1.0, 2.0, 3.0, 4.0]), DatasetKey::Unc, "val", 0)
                .unwrap_err()
                .contains("negative")
        );
        assert!(
            convert_row(&row(&[f64::NAN, 2.0, 3.0, 4.0]), DatasetKey::Unc, "val", 0)
                .unwrap_err()
                .contains("not finite")
        );
        assert!(
            convert_row(&row(&[1.0, 2.0, 3.0]), DatasetKey::Unc, "val", 0)
                .unwrap_err()
                .contains("3 numbers")
        );
        let short = Value::Tuple(vec![s("a.jpg"), nums(&[1.0, 2.0, 3.0, 4.0]), s("x")]);
        assert!(convert_row(&short, DatasetKey::Unc, "val", 0)
            .unwrap_err()
            .contains("has 3 items"));
        let empty = Value::Tuple(vec![s("a.jpg"), nums(&[1.0, 2.0, 3.0, 4.0]), s("  ")]);
        assert!(convert_row(&empty, DatasetKey::Flickr, "val", 0)
            .unwrap_err()
            .contains("empty expression"));
        let escape = Value::Tuple(vec![
            s("../../etc/passwd"),
            nums(&[1.0, 2.0, 3.0, 4.0]),
            s("x"),
        ]);
        assert!(convert_row(&escape, DatasetKey::Flickr, "val", 0)
            .unwrap_err()
            .contains("plain file name"));
    }

    #[test]
    fn keys_round_trip_and_trainval_files() {
        for k in DatasetKey::ALL {
            assert_eq!(DatasetKey::parse(k.key()), Some(k));
        }
        assert_eq!(
            DatasetKey::Unc.split_files("trainval"),
            ["unc/unc_train.pth", "unc/unc_val.pth"]
        );
        assert_eq!(
            DatasetKey::Referit.split_files("trainval"),
            ["referit/referit_trainval.pth"]
        );
    }
}
