//! The Swin backbone of an mmdet 2.x detector (QRNet's released Swin-S Mask R-CNN,
//! `LukeForeverYoung/QRNet`; mmcv's `{'meta', 'state_dict', 'optimizer'}` file) as our
//! QRNet visual encoder's parameters, to start training from: `backbone.patch_embed.*`,
//! `backbone.layers.{i}.blocks.{j}.*` (the fused `attn.qkv` split into query, key and
//! value; the `relative_position_index` buffers recomputed by our Swin), the patch
//! mergings, the per-stage output norms `backbone.norm{i}` and the neck's 1x1 lateral
//! convolutions. QRNet's own query-aware layers are not in a detector and start fresh; the
//! detector's heads (`rpn_head`, `roi_head`, `neck.fpn_convs`) are listed as unused.

use super::{format_err, Checkpoint, Op, Source};
use crate::error::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// What a detector gives a QRNet.
#[derive(Debug)]
pub struct MmdetBackbone {
    /// Our names relative to the QRNet visual encoder (`swin.*`, `out_norm.{i}.*`,
    /// `lateral.{i}.*`).
    pub tensors: HashMap<String, Tensor>,
    /// Detector keys that are not part of the backbone.
    pub unused: Vec<String>,
    /// Swin's embedding width, depths and head counts as the file has them.
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub heads: Vec<usize>,
}

/// Our source(s) of one detector key; `None`: not part of the backbone.
fn swin_sources(key: &str, shape: &[usize]) -> Option<Vec<(String, Source)>> {
    let copy = |p: String| Some(vec![(p, Source::copy(key, shape))]);
    if let Some(rest) = key.strip_prefix("neck.lateral_convs.") {
        let (i, leaf) = rest.split_once(".conv.")?;
        return match leaf {
            "weight" if shape.len() == 4 && shape[2..] == [1, 1] => Some(vec![(
                format!("lateral.{i}.weight"),
                Source {
                    op: Op::Reshape(key.to_string()),
                    shape: shape[..2].to_vec(),
                },
            )]),
            "bias" => copy(format!("lateral.{i}.bias")),
            _ => None,
        };
    }
    let rest = key.strip_prefix("backbone.")?;
    if let Some(w) = rest.strip_prefix("patch_embed.proj.") {
        return copy(format!("swin.embeddings.patch_embeddings.projection.{w}"));
    }
    if let Some(w) = rest.strip_prefix("patch_embed.norm.") {
        return copy(format!("swin.embeddings.norm.{w}"));
    }
    if let Some(r) = rest.strip_prefix("norm") {
        let (i, w) = r.split_once('.')?;
        i.parse::<usize>().ok()?;
        return copy(format!("out_norm.{i}.{w}"));
    }
    let r = rest.strip_prefix("layers.")?;
    let (i, leaf) = r.split_once('.')?;
    let stage = format!("swin.encoder.layers.{i}.");
    if let Some(w) = leaf.strip_prefix("downsample.") {
        return copy(format!("{stage}downsample.{w}"));
    }
    let r = leaf.strip_prefix("blocks.")?;
    let (j, leaf) = r.split_once('.')?;
    let block = format!("{stage}blocks.{j}.");
    if let Some(kind) = leaf.strip_prefix("attn.qkv.") {
        let c = shape[0] / 3;
        return Some(
            ["query", "key", "value"]
                .iter()
                .enumerate()
                .map(|(n, q)| {
                    let mut s = shape.to_vec();
                    s[0] = c;
                    (
                        format!("{block}attention.self.{q}.{kind}"),
                        Source {
                            op: Op::Rows(key.to_string(), n * c, c),
                            shape: s,
                        },
                    )
                })
                .collect(),
        );
    }
    const LEAVES: &[(&str, &str)] = &[
        ("norm1.", "layernorm_before."),
        (
            "attn.relative_position_bias_table",
            "attention.self.relative_position_bias_table",
        ),
        ("attn.proj.", "attention.output.dense."),
        ("norm2.", "layernorm_after."),
        ("mlp.fc1.", "intermediate.dense."),
        ("mlp.fc2.", "output.dense."),
    ];
    LEAVES.iter().find_map(|(from, to)| {
        leaf.strip_prefix(from)
            .and_then(|w| copy(format!("{block}{to}{w}")))
    })
}

/// Reads the Swin backbone of an mmdet detector checkpoint.
pub fn mmdet_swin_backbone(path: &Path) -> Result<MmdetBackbone> {
    let ckpt = Checkpoint::open_entry(path, "state_dict", "mmdet detector (mmcv)")?;
    let mut pairs = Vec::new();
    let mut unused = Vec::new();
    for (key, t) in &ckpt.entries {
        match swin_sources(key, &t.shape) {
            Some(list) => pairs.extend(list),
            None => unused.push(key.clone()),
        }
    }
    let shape = |k: &str| {
        ckpt.tensor(k).map(|t| t.shape.clone()).ok_or_else(|| {
            format_err(
                path,
                format!("no `{k}`: not a Swin detector (mmdet's SwinTransformer backbone)"),
            )
        })
    };
    let embed_dim = shape("backbone.patch_embed.proj.weight")?[0];
    let (mut depths, mut heads) = (Vec::new(), Vec::new());
    for i in 0.. {
        let blocks = (0..)
            .take_while(|j| {
                let k = format!("backbone.layers.{i}.blocks.{j}.norm1.weight");
                ckpt.tensor(&k).is_some()
            })
            .count();
        if blocks == 0 {
            break;
        }
        depths.push(blocks);
        heads.push(
            shape(&format!(
                "backbone.layers.{i}.blocks.0.attn.relative_position_bias_table"
            ))?[1],
        );
    }
    let tensors = ckpt.materialise(&pairs)?;
    Ok(MmdetBackbone {
        tensors,
        unused,
        embed_dim,
        depths,
        heads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detector_keys_map_to_our_swin() {
        let q = swin_sources("backbone.layers.2.blocks.5.attn.qkv.weight", &[96, 32]).unwrap();
        assert_eq!(
            q[2].0,
            "swin.encoder.layers.2.blocks.5.attention.self.value.weight"
        );
        assert_eq!(q[2].1.shape, vec![32, 32]);
        assert_eq!(
            swin_sources("backbone.norm3.bias", &[8]).unwrap()[0].0,
            "out_norm.3.bias"
        );
        let l = swin_sources("neck.lateral_convs.1.conv.weight", &[16, 32, 1, 1]).unwrap();
        assert_eq!(
            (l[0].0.as_str(), l[0].1.shape.as_slice()),
            ("lateral.1.weight", &[16, 32][..])
        );
        assert!(swin_sources(
            "backbone.layers.0.blocks.0.attn.relative_position_index",
            &[49, 49]
        )
        .is_none());
        assert!(swin_sources("neck.fpn_convs.0.conv.weight", &[16, 16, 3, 3]).is_none());
        assert!(swin_sources("rpn_head.rpn_conv.weight", &[16, 16, 3, 3]).is_none());
    }
}
