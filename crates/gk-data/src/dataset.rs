//! Canonical JSONL datasets: loading with validation, and access to decoded samples.
//!
//! Each line is a [`Record`]. A bad line (not JSON, missing field, empty expression,
//! non-finite, degenerate or out-of-image box, missing image) is a typed error naming the
//! file and line; with `skip_bad` it is skipped and counted instead.

use crate::error::{DataError, Result};
use crate::image_io;
use crate::record::Record;
use gk_box::Box4;
use image::RgbImage;
use std::path::{Path, PathBuf};

/// How much a box may stick out of the image (pixels) before it is rejected: annotation
/// tools round, and COCO boxes are often a fraction of a pixel outside.
pub const BOX_SLACK_PX: f32 = 2.0;

/// Where the published layouts keep the images of each logical root, tried in order when
/// `<root>/<logical path>` does not exist (TransVG's `ln_data`, HiVG/CLIP-VG's Flickr
/// folder with a hyphen, or a root that already is the image folder).
const IMAGE_DIRS: [(&str, &[&str]); 3] = [
    (
        "coco/train2014/",
        &[
            "other/images/mscoco/images/train2014/",
            "images/mscoco/images/train2014/",
            "mscoco/images/train2014/",
            "train2014/",
            "",
        ],
    ),
    ("referit/images/", &["referit/images/", "images/", ""]),
    (
        "flickr30k/images/",
        &[
            "Flickr30k/flickr30k_images/",
            "Flickr30k/flickr30k-images/",
            "flickr30k_images/",
            "flickr30k-images/",
            "",
        ],
    ),
];

/// The file of a record's image under `root`: the canonical path, or the first layout of
/// [`IMAGE_DIRS`] that has it (the canonical path when none does, for the error).
pub fn resolve_image(root: &Path, rel: &str) -> PathBuf {
    let direct = root.join(rel);
    if direct.exists() {
        return direct;
    }
    for (logical, dirs) in IMAGE_DIRS {
        if let Some(file) = rel.strip_prefix(logical) {
            for d in dirs {
                let p = root.join(format!("{d}{file}"));
                if p.exists() {
                    return p;
                }
            }
        }
    }
    direct
}

/// Options for [`Dataset::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Skip and count bad lines instead of failing on the first.
    pub skip_bad: bool,
    /// Check that every image exists and its header decodes (and fill width/height).
    pub check_images: bool,
}

/// A bad line that was skipped.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

/// One decoded sample: the image side of the pipeline (pixel boxes).
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: RgbImage,
    pub expr: String,
    /// Pixel xyxy.
    pub bbox: Box4,
}

/// A JSONL file of records plus the folder its image paths are relative to.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub image_root: PathBuf,
    pub records: Vec<Record>,
    pub skipped: Vec<Skipped>,
}

/// The checks every canonical record passes (non-empty expression, finite box with area,
/// inside the image up to [`BOX_SLACK_PX`] when its size is known or `check_images` reads
/// it); returns the image size when known. Converters run it too, so a converted file
/// never holds a row the loader would reject.
pub fn check_record(
    r: &Record,
    image_root: &Path,
    check_images: bool,
) -> std::result::Result<Option<(u32, u32)>, String> {
    if r.expr.trim().is_empty() {
        return Err("empty expression".into());
    }
    let b = r.bbox_xyxy;
    gk_box::check_xyxy(b).map_err(|e| e.to_string())?;
    if b[2] <= b[0] || b[3] <= b[1] {
        return Err(format!("degenerate box {b:?}: zero width or height"));
    }
    let mut size = r.width.zip(r.height);
    if check_images {
        let p = resolve_image(image_root, &r.image);
        let dims =
            image::image_dimensions(&p).map_err(|e| format!("image {}: {e}", p.display()))?;
        size = Some(dims);
    }
    if let Some((w, h)) = size {
        let (w, h) = (w as f32, h as f32);
        if b[0] < -BOX_SLACK_PX
            || b[1] < -BOX_SLACK_PX
            || b[2] > w + BOX_SLACK_PX
            || b[3] > h + BOX_SLACK_PX
        {
            return Err(format!("box {b:?} outside the {w}x{h} image"));
        }
    }
    Ok(size)
}

impl Dataset {
    /// Reads and validates a JSONL file; `image_root` defaults to the file's folder.
    pub fn load(path: &Path, image_root: Option<&Path>, opts: &LoadOptions) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let image_root = image_root
            .map(Path::to_path_buf)
            .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf());
        let mut records = Vec::new();
        let mut skipped = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<Record>(line)
                .map_err(|e| e.to_string())
                .and_then(|mut r| {
                    check_record(&r, &image_root, opts.check_images).map(|size| {
                        if let Some((w, h)) = size {
                            r.width = Some(w);
                            r.height = Some(h);
                        }
                        r
                    })
                });
            match parsed {
                Ok(r) => records.push(r),
                Err(msg) if opts.skip_bad => skipped.push(Skipped {
                    line: i + 1,
                    reason: msg,
                }),
                Err(msg) => {
                    return Err(DataError::Annotation {
                        path: path.to_path_buf(),
                        line: i + 1,
                        msg,
                    })
                }
            }
        }
        if records.is_empty() {
            return Err(DataError::Annotation {
                path: path.to_path_buf(),
                line: 0,
                msg: "no usable records".into(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            image_root,
            records,
            skipped,
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Decodes sample `i` (image from disk).
    pub fn get(&self, i: usize) -> Result<Sample> {
        let r = &self.records[i];
        let image = image_io::load_rgb(&resolve_image(&self.image_root, &r.image))?;
        Ok(Sample {
            image,
            expr: r.expr.clone(),
            bbox: r.bbox_xyxy,
        })
    }

    /// The expression type of record `i` (`extra.type`), if the source has one.
    pub fn expr_type(&self, i: usize) -> Option<&str> {
        self.records[i].extra.get("type").and_then(|v| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(lines: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::new(20, 10)
            .save(dir.path().join("a.png"))
            .unwrap();
        std::fs::write(dir.path().join("bad.png"), b"garbage").unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, lines.join("\n")).unwrap();
        (dir, p)
    }

    fn rec(image: &str, b: [f32; 4], expr: &str) -> String {
        serde_json::json!({"id": "x", "dataset": "t", "split": "val", "image": image, "bbox_xyxy": b, "expr": expr}).to_string()
    }

    #[test]
    fn every_bad_line_is_named_and_skippable() {
        let good = rec("a.png", [1.0, 1.0, 5.0, 5.0], "the thing");
        let cases = [
            ("{not json", "line"),
            (
                &rec("a.png", [1.0, 1.0, 5.0, 5.0], "   ") as &str,
                "empty expression",
            ),
            (&rec("a.png", [5.0, 1.0, 5.0, 5.0], "x"), "degenerate"),
            (&rec("a.png", [6.0, 1.0, 5.0, 5.0], "x"), "degenerate"),
            (&rec("a.png", [1.0, 1.0, 50.0, 5.0], "x"), "outside"),
            (
                &rec("missing.png", [1.0, 1.0, 5.0, 5.0], "x"),
                "missing.png",
            ),
            (&rec("bad.png", [1.0, 1.0, 5.0, 5.0], "x"), "bad.png"),
            (
                r#"{"id":"x","dataset":"t","split":"v","image":"a.png","bbox_xyxy":[1,1,5],"expr":"x"}"#,
                "line",
            ),
        ];
        let opts = LoadOptions {
            skip_bad: false,
            check_images: true,
        };
        for (bad, what) in cases {
            let (_d, p) = setup(&[&good, bad]);
            let e = Dataset::load(&p, None, &opts).unwrap_err().to_string();
            assert!(e.contains("d.jsonl:2:") && e.contains(what), "{bad}: {e}");
        }
        let all: Vec<&str> = std::iter::once(good.as_str())
            .chain(cases.iter().map(|c| c.0))
            .collect();
        let (_d, p) = setup(&all);
        let ds = Dataset::load(
            &p,
            None,
            &LoadOptions {
                skip_bad: true,
                check_images: true,
            },
        )
        .unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(ds.skipped.len(), cases.len());
        assert_eq!(ds.records[0].width, Some(20));
    }

    #[test]
    fn corrupt_image_at_get_time_is_a_typed_error() {
        let (_d, p) = setup(&[&rec("bad.png", [1.0, 1.0, 5.0, 5.0], "x")]);
        let ds = Dataset::load(&p, None, &LoadOptions::default()).unwrap();
        let e = ds.get(0).unwrap_err();
        assert!(matches!(e, DataError::Image { .. }) && e.to_string().contains("bad.png"));
    }
}
