//! ReferItGame in the layout of its first grounding benchmark (ronghanghu/text_objseg's
//! `exp-referit/data`, the files ReSC's `process_referit` and so TransVG's `referit_*.pth`
//! were built from):
//!
//! - `referit_query_<split>.json`: `{"<image>_<k>.png": ["query", ...]}` for split `train`,
//!   `val`, `trainval`, `test` (or `all`); an image crop (one annotated region) can have
//!   several queries;
//! - `referit_bbox.json`: `{"<image>_<k>.png": [x1, y1, x2, y2]}` in pixels;
//! - `referit_imsize.json` (optional): `{"<image>.jpg": [width, height]}`.
//!
//! One canonical record per (crop, query), in the order of the query file (text_objseg's
//! test script flattens the same way, crop by crop, query by query); the image is
//! `referit/images/<image>.jpg` (`name.split('_', 1)[0] + '.jpg'`) and the box is the crop's
//! box as stored (xyxy, as TransVG's loader reads ReferIt rows). The three images the
//! published split lists leave out (`../shared/data.md` §1.1) are skipped and counted.
//! Every problem (a crop without a box, a bad box, an empty or non-text query, a crop name
//! that is not `<image>_<k>.png`) is an error naming the file and the crop.

use crate::dataset::Skipped;
use crate::error::{DataError, Result};
use crate::published::{to_xyxy, Converted, SourceFile};
use crate::record::Record;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// The splits text_objseg ships query files for.
pub const SPLITS: [&str; 5] = ["train", "val", "trainval", "test", "all"];

/// Images the published ReferIt split lists leave out (`../shared/data.md` §1.1).
const LEFT_OUT: [&str; 3] = ["19579", "17975", "19575"];

/// Why a crop gives no records: one of the left-out images (always skipped) or a defect
/// (an error, or skipped and counted with `skip_bad`).
enum Drop {
    LeftOut(String),
    Bad(String),
}

/// A JSON object's entries in file order (the query files' order is the records' order).
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    sources: &mut Vec<SourceFile>,
) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sources.push(SourceFile::of(path, &bytes));
    serde_json::from_slice(&bytes).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        msg: format!("not the expected JSON object: {e}"),
    })
}

/// `"<image>_<k>.png"` -> `"<image>"` (both parts digits).
fn image_of(crop: &str) -> std::result::Result<&str, String> {
    let bad = || format!("crop name `{crop}` is not `<image>_<k>.png`");
    let stem = crop.strip_suffix(".png").ok_or_else(bad)?;
    let (image, k) = stem.split_once('_').ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(image) || !digits(k) {
        return Err(bad());
    }
    Ok(image)
}

fn numbers<const N: usize>(v: &Value) -> Option<[f64; N]> {
    let a = v.as_array().filter(|a| a.len() == N)?;
    let mut out = [0f64; N];
    for (o, x) in out.iter_mut().zip(a) {
        *o = x.as_f64()?;
    }
    Some(out)
}

/// Reads split `split` of a text_objseg `data` folder (see the module docs). With
/// `skip_bad`, a bad crop is skipped and counted instead of stopping the conversion.
pub fn read(dir: &Path, split: &str, skip_bad: bool) -> Result<Converted> {
    let mut conv = Converted::default();
    if !SPLITS.contains(&split) {
        return Err(DataError::Format {
            path: dir.to_path_buf(),
            msg: format!(
                "ReferIt has no split `{split}` (splits: {})",
                SPLITS.join(", ")
            ),
        });
    }
    let qpath = dir.join(format!("referit_query_{split}.json"));
    let bpath = dir.join("referit_bbox.json");
    let spath = dir.join("referit_imsize.json");
    let Ordered(queries) = read_json(&qpath, &mut conv.sources)?;
    let boxes: HashMap<String, Value> = read_json(&bpath, &mut conv.sources)?;
    let sizes: HashMap<String, Value> = if spath.exists() {
        read_json(&spath, &mut conv.sources)?
    } else {
        HashMap::new()
    };
    let mut index = 0usize;
    for (row, (crop, list)) in queries.iter().enumerate() {
        let one = (|| -> std::result::Result<Vec<Record>, Drop> {
            let image = image_of(crop).map_err(Drop::Bad)?;
            if LEFT_OUT.contains(&image) {
                return Err(Drop::LeftOut(format!(
                    "image {image}.jpg is one of the three the published lists leave out"
                )));
            }
            let raw = boxes
                .get(crop)
                .ok_or_else(|| Drop::Bad(format!("crop `{crop}` has no box in referit_bbox.json")))
                .and_then(|b| {
                    numbers::<4>(b)
                        .ok_or_else(|| Drop::Bad(format!("box of `{crop}` is {b}, not 4 numbers")))
                })?;
            let xyxy = to_xyxy(raw, false).map_err(|m| Drop::Bad(format!("crop `{crop}`: {m}")))?;
            let size = sizes
                .get(&format!("{image}.jpg"))
                .and_then(numbers::<2>)
                .filter(|s| s.iter().all(|d| *d > 0.0 && d.fract() == 0.0));
            let texts = list
                .as_array()
                .ok_or_else(|| Drop::Bad(format!("queries of `{crop}` are {list}, not a list")))?;
            let mut out = Vec::new();
            for q in texts {
                let expr = q
                    .as_str()
                    .ok_or_else(|| Drop::Bad(format!("a query of `{crop}` is {q}, not text")))?;
                if expr.trim().is_empty() {
                    return Err(Drop::Bad(format!("crop `{crop}` has an empty query")));
                }
                let mut extra = serde_json::Map::new();
                extra.insert("imcrop".into(), crop.clone().into());
                extra.insert("bbox_raw".into(), serde_json::json!(raw));
                out.push(Record {
                    id: String::new(), // numbered below, over the kept records
                    dataset: "referit".into(),
                    split_by: None,
                    split: split.to_string(),
                    image: format!("referit/images/{image}.jpg"),
                    width: size.map(|s| s[0] as u32),
                    height: size.map(|s| s[1] as u32),
                    bbox_xyxy: xyxy.map(|c| c as f32),
                    bbox_src: "xyxy".into(),
                    expr: expr.to_string(),
                    extra,
                });
            }
            Ok(out)
        })();
        match one {
            Ok(records) => {
                for mut r in records {
                    r.id = format!("referit/{split}/{index:06}");
                    index += 1;
                    conv.records.push(r);
                }
            }
            Err(Drop::LeftOut(reason)) => conv.skipped.push(Skipped { line: row, reason }),
            Err(Drop::Bad(reason)) if skip_bad => conv.skipped.push(Skipped { line: row, reason }),
            Err(Drop::Bad(msg)) => {
                return Err(DataError::Row {
                    path: qpath,
                    row,
                    msg,
                })
            }
        }
    }
    Ok(conv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(queries: &str, boxes: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("referit_query_test.json"), queries).unwrap();
        std::fs::write(d.path().join("referit_bbox.json"), boxes).unwrap();
        std::fs::write(
            d.path().join("referit_imsize.json"),
            r#"{"8155.jpg": [480, 360], "4567.jpg": [360, 480]}"#,
        )
        .unwrap();
        d
    }

    const BOXES: &str = r#"{"8155_7.png": [10, 20, 110, 220], "4567_3.png": [145, 62, 459, 243],
        "19579_1.png": [0, 0, 5, 5]}"#;

    #[test]
    fn records_follow_the_query_file_crop_by_crop_query_by_query() {
        let d = folder(
            r#"{"8155_7.png": ["step to the left of person", "rock like a bench"],
                "4567_3.png": ["animal"], "19579_1.png": ["sky"]}"#,
            BOXES,
        );
        let c = read(d.path(), "test", false).unwrap();
        let got: Vec<(&str, &str, [f32; 4])> = c
            .records
            .iter()
            .map(|r| (r.id.as_str(), r.expr.as_str(), r.bbox_xyxy))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "referit/test/000000",
                    "step to the left of person",
                    [10.0, 20.0, 110.0, 220.0]
                ),
                (
                    "referit/test/000001",
                    "rock like a bench",
                    [10.0, 20.0, 110.0, 220.0]
                ),
                ("referit/test/000002", "animal", [145.0, 62.0, 459.0, 243.0]),
            ]
        );
        let r = &c.records[2];
        assert_eq!(r.image, "referit/images/4567.jpg");
        assert_eq!((r.width, r.height), (Some(360), Some(480)));
        assert_eq!(r.extra["imcrop"], "4567_3.png");
        assert_eq!(c.skipped.len(), 1, "the left-out image is skipped");
        assert!(c.skipped[0].reason.contains("19579"));
        assert_eq!(c.sources.len(), 3);
    }

    #[test]
    fn bad_crops_are_errors_naming_file_and_crop_or_skipped() {
        let cases = [
            (
                r#"{"8155_7.png": ["ok"], "9_1.png": ["no box"]}"#,
                "has no box",
            ),
            (r#"{"8155_7.png": [""]}"#, "empty query"),
            (r#"{"8155_7.png": [3]}"#, "not text"),
            (r#"{"8155_7.png": "one"}"#, "not a list"),
            (r#"{"8155.png": ["x"]}"#, "not `<image>_<k>.png`"),
            (
                r#"{"4567_3.png": ["x"], "8155_7.png": ["y"], "1_1.png": ["z"]}"#,
                "has no box",
            ),
        ];
        for (q, want) in cases {
            let d = folder(q, BOXES);
            let e = read(d.path(), "test", false).unwrap_err().to_string();
            assert!(
                e.contains("referit_query_test.json") && e.contains(want),
                "{e}"
            );
            let c = read(d.path(), "test", true).unwrap();
            assert_eq!(c.skipped.len(), 1, "{q}");
        }
        let d = folder(
            r#"{"8155_7.png": ["x"]}"#,
            r#"{"8155_7.png": [50, 20, 10, 220]}"#,
        );
        let e = read(d.path(), "test", false).unwrap_err().to_string();
        assert!(e.contains("8155_7.png") && e.contains("no area"), "{e}");
        let d = folder(r#"{"8155_7.png": ["x"]}"#, r#"{"8155_7.png": [1, 2, 3]}"#);
        let e = read(d.path(), "test", false).unwrap_err().to_string();
        assert!(e.contains("not 4 numbers"), "{e}");
        let d = folder("[1, 2]", BOXES);
        let e = read(d.path(), "test", false).unwrap_err().to_string();
        assert!(e.contains("not the expected JSON object"), "{e}");
        let e = read(d.path(), "testA", false).unwrap_err().to_string();
        assert!(e.contains("no split `testA`"), "{e}");
        let e = read(d.path(), "val", false).unwrap_err().to_string();
        assert!(e.contains("referit_query_val.json"), "{e}");
    }
}
