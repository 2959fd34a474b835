//! The canonical annotation record: one JSON line per (expression, box).
//!
//! Every dataset reader converts to this once; training and evaluation read only JSONL
//! of these records (schema in `shared/data.md` §1.6). Boxes are absolute pixel xyxy
//! (x2 = x + w, no +1), the image side of the one box convention in `gk-box`.

use serde::{Deserialize, Serialize};

/// One referring expression and the box it refers to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unique id, e.g. `"unc/val/000123"` or `"synth/train/000042"`.
    pub id: String,
    /// Dataset name (`refcoco`, `synth`, ...).
    pub dataset: String,
    /// How the split was made (`unc`, `umd`, ...), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_by: Option<String>,
    /// Split name (`train`, `val`, `testA`, ...).
    pub split: String,
    /// Image path relative to an image root.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Absolute pixel box `[x1, y1, x2, y2]`.
    pub bbox_xyxy: [f32; 4],
    /// The box convention of the source (`xywh` or `xyxy`).
    #[serde(default = "default_bbox_src")]
    pub bbox_src: String,
    /// The referring expression.
    pub expr: String,
    /// Anything else the source carried (expression type, phrases, mask file, ...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_bbox_src() -> String {
    "xyxy".to_string()
}
