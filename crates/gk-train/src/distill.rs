//! The distillation and contrastive losses of EpmVG, DUET and the teacher's pretraining
//! (`shared/methods.md` §5-§7), as plain functions of tensors; golden values against a
//! torch reference in `tests/golden.rs`.
//!
//! - [`info_nce`]: CLIP's symmetric image-text InfoNCE with a logit scale.
//! - [`similarity_kl`]: the cross-modal term, `T² · KL(softmax(teacher / T) ‖ softmax(student / T))`
//!   over each row of an in-batch similarity matrix and of its transpose, averaged.
//! - [`feature_loss`]: cosine (`1 - cos`) or MSE between projected student features and
//!   teacher features.
//! - [`region_info_nce`]: DUET's region contrast with several positives per anchor:
//!   `-log Σ_pos exp(s/τ) / Σ_all exp(s/τ)` on cosine similarities.
//! - [`sla_offsets`], [`sla_select`]: DUET's Semantics-Location-Aware sampling (ours): candidate
//!   boxes placed relative to the target, kept as positives or negatives by their IoU with it
//!   and the teacher's region-expression similarity.
//!
//! Every function is built from differentiable ops (`log_softmax` is composed in
//! candle_nn), and all reduce to a scalar mean.

use crate::error::Result;
use candle_core::{DType, Tensor, D};
use gk_models::nn::{l2_normalize, masked_mean};
use serde::{Deserialize, Serialize};

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(x, D::Minus1)?)
}

/// Mean cross-entropy of `[N, N]` logits against the diagonal.
fn diagonal_ce(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let eye = Tensor::eye(n, DType::F32, logits.device())?.to_dtype(logits.dtype())?;
    Ok((log_softmax(logits)? * eye)?
        .sum_all()?
        .affine(-1.0 / n as f64, 0.0)?)
}

/// Symmetric InfoNCE of paired rows `a, b: [N, D]` (normalised here) with logits
/// `scale · cos`: the mean of the a→b and b→a cross-entropies.
pub fn info_nce(a: &Tensor, b: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let logits = l2_normalize(a)?
        .matmul(&l2_normalize(b)?.t()?)?
        .broadcast_mul(scale)?; // [N, N]
    Ok(((diagonal_ce(&logits)? + diagonal_ce(&logits.t()?)?)? * 0.5)?)
}

/// `T² · KL(p_teacher ‖ p_student)` with `p = softmax(logits / T)`, per row, mean over rows.
fn kl_rows(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let n = student.dim(0)?;
    let ls = log_softmax(&(student / t)?)?;
    let lt = log_softmax(&(teacher / t)?)?;
    let kl = (lt.exp()? * (lt - ls)?)?.sum_all()?;
    Ok(kl.affine(t * t / n as f64, 0.0)?)
}

/// The cross-modal distillation term on in-batch similarity matrices `[N, N]` (image rows,
/// text columns): row-wise KL image→text plus column-wise text→image, averaged.
pub fn similarity_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let teacher = teacher.detach();
    let rows = kl_rows(student, &teacher, temperature)?;
    let cols = kl_rows(
        &student.t()?.contiguous()?,
        &teacher.t()?.contiguous()?,
        temperature,
    )?;
    Ok(((rows + cols)? * 0.5)?)
}

/// How student features are matched to teacher features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLoss {
    /// `mean(1 - cos(s, t))`.
    #[default]
    Cosine,
    /// `mean((s - t)²)` over all elements.
    Mse,
}

/// Feature distillation between `student, teacher: [N, D]` (the teacher is not trained).
pub fn feature_loss(student: &Tensor, teacher: &Tensor, kind: FeatureLoss) -> Result<Tensor> {
    let teacher = teacher.detach();
    Ok(match kind {
        FeatureLoss::Cosine => {
            let cos = (l2_normalize(student)? * l2_normalize(&teacher)?)?.sum(D::Minus1)?;
            cos.affine(-1.0, 1.0)?.mean_all()?
        }
        FeatureLoss::Mse => (student - teacher)?.sqr()?.mean_all()?,
    })
}

/// Region contrast: `anchor: [N, D]` against `candidates: [N, K, D]`, `positive: [N, K]`
/// (1 = positive, 0 = negative; every row needs a positive), optional `valid: [N, K]` (0 =
/// an empty slot, left out of both sums), temperature `tau`; cosine similarities; mean over
/// anchors of `-log Σ_pos e^{s/τ} / Σ_valid e^{s/τ}`.
pub fn region_info_nce(
    anchor: &Tensor,
    candidates: &Tensor,
    positive: &Tensor,
    valid: Option<&Tensor>,
    tau: f64,
) -> Result<Tensor> {
    let n = anchor.dim(0)?;
    let a = l2_normalize(anchor)?.unsqueeze(2)?; // [N, D, 1]
    let mut s = (l2_normalize(candidates)?.matmul(&a)?.squeeze(2)? / tau)?; // [N, K]
    if let Some(v) = valid {
        s = (s + (v.affine(-1.0, 1.0)? * -1e9)?)?; // empty slots at -1e9
    }
    let all = logsumexp(&s)?; // [N]
    let neg_inf = ((positive.affine(-1.0, 1.0))? * -1e9)?; // 0 on positives, -1e9 elsewhere
    let pos = logsumexp(&(s + neg_inf)?)?;
    Ok((all - pos)?.sum_all()?.affine(1.0 / n as f64, 0.0)?)
}

/// `log Σ exp` over the last dimension, `[N, K] -> [N]`.
fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    Ok((x.broadcast_sub(&max)?.exp()?.sum(D::Minus1)?.log()? + max.squeeze(D::Minus1)?)?)
}

/// Distillation settings of a run (`[distill]` in its config). EpmVG's terms are ours
/// where the paper is not public (`docs/methods.md`): the student's pooled backbone
/// features, projected into the teacher space, are pulled toward the teacher's image and
/// expression embeddings (`feature`), and the student's in-batch image-text similarity
/// distribution toward the teacher's (`cross`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Teacher folder: a Hugging Face CLIP folder or `groundkit pretrain-teacher`'s.
    pub teacher: std::path::PathBuf,
    /// The teacher's embedding size; filled in when the run is prepared, checked at training.
    #[serde(default)]
    pub teacher_dim: usize,
    /// Weight of the feature terms (visual and text), 0 = off.
    #[serde(default)]
    pub feature: f64,
    #[serde(default)]
    pub feature_kind: FeatureLoss,
    /// Weight of the cross-modal similarity KL, 0 = off.
    #[serde(default)]
    pub cross: f64,
    /// Softmax temperature of the cross-modal term.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// DUET's teacher semantic distillation (ours, region-level): the student's feature of
    /// the target region (RoIAlign on its visual map) and its expression feature, projected
    /// into one shared space, pulled toward the teacher's embedding of the target crop and of
    /// the expression. 0 = off.
    #[serde(default)]
    pub duet_region: f64,
    /// DUET: InfoNCE between the student's projected region and expression features (the
    /// shared space links vision and language). 0 = off.
    #[serde(default)]
    pub duet_align: f64,
    /// DUET's self-distillation (ours where the paper is not public): the fused feature of
    /// the predicted region (RoIAlign on the fusion's visual tokens) contrasted with SLA
    /// positives and negatives ([`region_info_nce`]). 0 = off.
    #[serde(default)]
    pub duet_self: f64,
    #[serde(default)]
    pub sla: SlaConfig,
    /// Teacher embeddings computed every step on the augmented batch (the teacher sees what
    /// the student sees) instead of read from the feature cache of the unaugmented data.
    #[serde(default)]
    pub live: bool,
}

fn default_temperature() -> f64 {
    2.0
}

/// Semantics-Location-Aware sampling (DUET; the rule is ours, `docs/methods.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlaConfig {
    /// A candidate is a location positive at IoU >= this with the target...
    pub pos_iou: f32,
    /// ...and a location negative at IoU <= this.
    pub neg_iou: f32,
    /// Positives per anchor, the target box included (empty slots are left out).
    pub positives: usize,
    /// Negatives per anchor: the location negatives the teacher finds most like the
    /// expression (hard negatives).
    pub negatives: usize,
    /// A location positive stays positive only if the teacher scores its crop at least
    /// `target score - margin` against the expression.
    pub margin: f32,
    /// Temperature of the region contrast.
    pub tau: f64,
}

impl Default for SlaConfig {
    fn default() -> Self {
        Self {
            pos_iou: 0.6,
            neg_iou: 0.3,
            positives: 3,
            negatives: 6,
            margin: 0.05,
            tau: 0.1,
        }
    }
}

/// Candidate boxes per record for SLA sampling.
pub const SLA_CANDIDATES: usize = 12;

/// A candidate relative to its target box: centre moved by `(dx·w, dy·h)`, sides scaled by
/// `(sw, sh)`. Relative offsets survive the letterbox, scale, translation and crop of the
/// transforms unchanged; a flip mirrors them ([`mirror`]).
pub type Offset = [f32; 4];

/// `o` seen in a left-right mirrored image.
pub fn mirror(o: Offset) -> Offset {
    [-o[0], o[1], o[2], o[3]]
}

/// The candidate at offset `o` from the cxcywh box `b` (any frame).
pub fn apply_offset(b: gk_box::Box4, o: Offset) -> gk_box::Box4 {
    [
        b[0] + o[0] * b[2],
        b[1] + o[1] * b[3],
        b[2] * o[2],
        b[3] * o[3],
    ]
}

/// IoU of a candidate at offset `o` with its target (the same in every frame).
pub fn offset_iou(o: Offset) -> f32 {
    let unit = [0.0, 0.0, 1.0, 1.0];
    gk_box::iou(
        gk_box::cxcywh_to_xyxy(unit),
        gk_box::cxcywh_to_xyxy(apply_offset(unit, o)),
    )
    .unwrap_or(0.0)
}

/// The [`SLA_CANDIDATES`] offsets of record `id`, seeded by the id: mirror pairs (`2i + 1`
/// is `2i` mirrored, so the set is the same in a flipped image); two pairs near the target
/// (centre within 15% of its size, sides within ±20%), then pairs away from it: shifted by
/// 0.8-2 sides horizontally or vertically, or 2.2-3 times larger.
pub fn sla_offsets(id: &str) -> Vec<Offset> {
    use rand::{Rng, SeedableRng};
    let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut u = |lo: f32, hi: f32| rng.random_range(lo..hi);
    let mut out = Vec::with_capacity(SLA_CANDIDATES);
    for pair in 0..SLA_CANDIDATES / 2 {
        let o = match (pair, pair % 3) {
            (0 | 1, _) => [
                u(-0.15, 0.15),
                u(-0.15, 0.15),
                u(-0.2, 0.2).exp(),
                u(-0.2, 0.2).exp(),
            ],
            (_, 0) => [
                u(0.8, 2.0),
                u(-0.4, 0.4),
                u(-0.15, 0.15).exp(),
                u(-0.15, 0.15).exp(),
            ],
            (_, 1) => {
                let dy = u(0.8, 2.0);
                [
                    u(-0.4, 0.4),
                    if u(0.0, 1.0) < 0.5 { dy } else { -dy },
                    u(-0.15, 0.15).exp(),
                    u(-0.15, 0.15).exp(),
                ]
            }
            _ => {
                let s = u(2.2, 3.0);
                [u(-0.3, 0.3), u(-0.3, 0.3), s, s * u(0.9, 1.1)]
            }
        };
        out.push(o);
        out.push(mirror(o));
    }
    out
}

/// A member of an anchor's contrast set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Target,
    Candidate(usize),
}

/// SLA for one sample: `scores[k]` is the teacher's similarity of candidate `k`'s crop to
/// the expression, `target_score` that of the target's crop. Positives: the target, then
/// location positives (IoU >= `pos_iou`) that the teacher scores at least `target_score -
/// margin`, best first, `positives` at most. Negatives: location negatives (IoU <=
/// `neg_iou`), highest score first (the hardest), `negatives` at most.
pub fn sla_select(
    cfg: &SlaConfig,
    offsets: &[Offset],
    scores: &[f32],
    target_score: f32,
) -> (Vec<Slot>, Vec<Slot>) {
    let by_score = |mut v: Vec<usize>| {
        v.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        v
    };
    let ious: Vec<f32> = offsets.iter().map(|&o| offset_iou(o)).collect();
    let pos = by_score(
        (0..offsets.len())
            .filter(|&k| ious[k] >= cfg.pos_iou && scores[k] >= target_score - cfg.margin)
            .collect(),
    );
    let neg = by_score(
        (0..offsets.len())
            .filter(|&k| ious[k] <= cfg.neg_iou)
            .collect(),
    );
    let positives = std::iter::once(Slot::Target)
        .chain(pos.into_iter().map(Slot::Candidate))
        .take(cfg.positives.max(1))
        .collect();
    let negatives = neg
        .into_iter()
        .map(Slot::Candidate)
        .take(cfg.negatives)
        .collect();
    (positives, negatives)
}

/// The SLA inputs of one batch, per sample: the candidates' offsets in the frame the
/// student sees (mirrored when the image was flipped), the teacher's score of each, and
/// the teacher's score of the target crop.
#[derive(Debug, Clone)]
pub struct SlaBatch {
    pub offsets: Vec<Vec<Offset>>,
    pub scores: Vec<Vec<f32>>,
    pub target: Vec<f32>,
}

/// The student-side projections (keys `distill.visual`, `distill.text`, `distill.region`
/// into the teacher space, `distill.fused` for the self-distillation's region contrast);
/// trained with the student, unused at inference.
#[derive(Debug, Clone)]
pub struct DistillHeads {
    visual: candle_nn::Linear,
    text: candle_nn::Linear,
    region: candle_nn::Linear,
    fused: candle_nn::Linear,
}

impl DistillHeads {
    /// `fused_dim` is the width of the fusion's tokens.
    pub fn new(
        vb: candle_nn::VarBuilder,
        visual_dim: usize,
        text_dim: usize,
        fused_dim: usize,
        teacher_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            visual: candle_nn::linear(visual_dim, teacher_dim, vb.pp("visual"))?,
            text: candle_nn::linear(text_dim, teacher_dim, vb.pp("text"))?,
            region: candle_nn::linear(visual_dim, teacher_dim, vb.pp("region"))?,
            fused: candle_nn::linear(fused_dim, fused_dim, vb.pp("fused"))?,
        })
    }
}

/// The teacher's embeddings of one batch (L2-normalised `[B, P]`) and its logit scale.
#[derive(Debug, Clone)]
pub struct TeacherBatch {
    pub image: Tensor,
    pub text: Tensor,
    /// The teacher's embedding of each target region (a crop around the ground-truth box).
    pub region: Tensor,
    pub scale: f64,
    /// SLA inputs, when the run uses DUET's self-distillation.
    pub sla: Option<SlaBatch>,
}

/// The names of every distillation loss term, as logged.
pub const TERMS: [&str; 7] = [
    "kd_visual",
    "kd_text",
    "kd_cross",
    "kd_region",
    "kd_dtext",
    "kd_align",
    "kd_self",
];

/// The distillation losses of one batch that `cfg` turns on, pushed into `parts`:
/// EpmVG's `kd_visual`, `kd_text`, `kd_cross` and DUET's `kd_region`, `kd_dtext`,
/// `kd_align`, `kd_self`. `target: [B, 4]` is the normalised cxcywh box in the model frame. The
/// student's projected expression feature is shared by both methods.
pub fn distill_losses(
    cfg: &DistillConfig,
    heads: &DistillHeads,
    out: &gk_models::grounder::GrounderOutput,
    text_mask: &Tensor,
    target: &Tensor,
    teacher: &TeacherBatch,
    parts: &mut crate::losses::LossParts,
) -> Result<()> {
    use candle_core::Module;
    let epmvg = cfg.feature > 0.0 || cfg.cross > 0.0;
    let duet = cfg.duet_region > 0.0 || cfg.duet_align > 0.0;
    if cfg.duet_self > 0.0 {
        let sla = teacher.sla.as_ref().ok_or_else(|| {
            crate::error::TrainError::Config(
                "DUET's self-distillation needs the teacher's SLA scores".into(),
            )
        })?;
        parts.push(
            "kd_self",
            cfg.duet_self,
            duet_self_term(cfg, heads, out, target, sla)?,
        );
    }
    if !epmvg && !duet {
        return Ok(());
    }
    let t = heads
        .text
        .forward(&masked_mean(&out.text.tokens, text_mask)?)?; // [B, P]
    if epmvg {
        epmvg_terms(cfg, heads, out, &t, teacher, parts)?;
    }
    if duet {
        duet_teacher_terms(cfg, heads, out, &t, target, teacher, parts)?;
    }
    Ok(())
}

/// EpmVG (ours): pooled backbone feature to the teacher's image embedding, expression
/// feature `t` to its text embedding, and the in-batch similarity KL.
fn epmvg_terms(
    cfg: &DistillConfig,
    heads: &DistillHeads,
    out: &gk_models::grounder::GrounderOutput,
    t: &Tensor,
    teacher: &TeacherBatch,
    parts: &mut crate::losses::LossParts,
) -> Result<()> {
    use candle_core::Module;
    let v = heads
        .visual
        .forward(&masked_mean(&out.visual.tokens, &out.visual.mask)?)?; // [B, P]
    if cfg.feature > 0.0 {
        parts.push(
            "kd_visual",
            cfg.feature,
            feature_loss(&v, &teacher.image, cfg.feature_kind)?,
        );
        parts.push(
            "kd_text",
            cfg.feature,
            feature_loss(t, &teacher.text, cfg.feature_kind)?,
        );
    }
    if cfg.cross > 0.0 {
        // Both similarity matrices on the teacher's logit scale, so T softens them alike.
        let student = (l2_normalize(&v)?.matmul(&l2_normalize(t)?.t()?)? * teacher.scale)?;
        let teach = (teacher.image.matmul(&teacher.text.t()?)? * teacher.scale)?;
        parts.push(
            "kd_cross",
            cfg.cross,
            similarity_kl(&student, &teach, cfg.temperature)?,
        );
    }
    Ok(())
}

/// DUET's teacher semantic distillation (see [`DistillConfig::duet_region`]): the
/// RoIAlign feature of the target region and the expression feature `zt` in one space.
fn duet_teacher_terms(
    cfg: &DistillConfig,
    heads: &DistillHeads,
    out: &gk_models::grounder::GrounderOutput,
    zt: &Tensor,
    target: &Tensor,
    teacher: &TeacherBatch,
    parts: &mut crate::losses::LossParts,
) -> Result<()> {
    use candle_core::Module;
    let boxes: Vec<(usize, gk_box::Box4)> = target
        .to_vec2::<f32>()?
        .iter()
        .enumerate()
        .map(|(i, t)| (i, [t[0], t[1], t[2], t[3]]))
        .collect();
    let region = pool_regions(&out.visual.tokens, out.visual.grid, &boxes)?; // [B, Cv]
    let zr = heads.region.forward(&region)?; // [B, P]
    if cfg.duet_region > 0.0 {
        parts.push(
            "kd_region",
            cfg.duet_region,
            feature_loss(&zr, &teacher.region, FeatureLoss::Cosine)?,
        );
        parts.push(
            "kd_dtext",
            cfg.duet_region,
            feature_loss(zt, &teacher.text, FeatureLoss::Cosine)?,
        );
    }
    if cfg.duet_align > 0.0 {
        let scale = Tensor::new(teacher.scale as f32, zr.device())?;
        parts.push("kd_align", cfg.duet_align, info_nce(&zr, zt, &scale)?);
    }
    Ok(())
}

/// Mean RoIAlign (2x2 bins) features of `boxes` (sample, normalised cxcywh, clamped to the
/// image square) on the last `gh * gw` tokens of `tokens: [B, N, C]`: `[R, C]`.
fn pool_regions(
    tokens: &Tensor,
    (gh, gw): (usize, usize),
    boxes: &[(usize, gk_box::Box4)],
) -> Result<Tensor> {
    use gk_models::roi_align::{roi_align, Roi, RoiAlignConfig};
    let n = tokens.dim(1)?;
    let cells = tokens.narrow(1, n - gh * gw, gh * gw)?; // [B, gh*gw, C] (no CLS)
    let rois: Vec<Roi> = boxes
        .iter()
        .map(|&(batch, b)| {
            let [x1, y1, x2, y2] = gk_box::clamp(gk_box::cxcywh_to_xyxy(b), 0.0, 1.0);
            Roi {
                batch,
                xyxy: [
                    x1 * gw as f32,
                    y1 * gh as f32,
                    x2 * gw as f32,
                    y2 * gh as f32,
                ],
            }
        })
        .collect();
    let cfg = RoiAlignConfig {
        output: (2, 2),
        spatial_scale: 1.0,
        sampling_ratio: 2,
        aligned: true,
    };
    Ok(roi_align(&cells, (gh, gw), &rois, &cfg)?.mean(1)?)
}

/// DUET's self-distillation (ours, see [`DistillConfig::duet_self`]): the projected fused
/// feature of each predicted box against its SLA positives and negatives, all pooled from
/// the fusion's visual tokens. The boxes are constants; the gradient reaches the features.
fn duet_self_term(
    cfg: &DistillConfig,
    heads: &DistillHeads,
    out: &gk_models::grounder::GrounderOutput,
    target: &Tensor,
    sla: &SlaBatch,
) -> Result<Tensor> {
    use candle_core::Module;
    let pred = out.pred_box.detach().to_vec2::<f32>()?;
    let tgt = target.to_vec2::<f32>()?;
    let b = pred.len();
    let (np, nn) = (cfg.sla.positives.max(1), cfg.sla.negatives);
    let slots = np + nn;
    let as_box = |v: &[f32]| [v[0], v[1], v[2], v[3]];
    // anchors first, then each sample's slots; empty slots pool the target and are masked
    let mut boxes: Vec<(usize, gk_box::Box4)> = pred
        .iter()
        .enumerate()
        .map(|(i, p)| (i, as_box(p)))
        .collect();
    let (mut positive, mut valid) = (vec![0f32; b * slots], vec![0f32; b * slots]);
    for i in 0..b {
        let t = as_box(&tgt[i]);
        let (pos, neg) = sla_select(&cfg.sla, &sla.offsets[i], &sla.scores[i], sla.target[i]);
        let place = |slot: Slot| match slot {
            Slot::Target => t,
            Slot::Candidate(k) => apply_offset(t, sla.offsets[i][k]),
        };
        for s in 0..slots {
            let member = if s < np { pos.get(s) } else { neg.get(s - np) };
            boxes.push((i, member.map_or(t, |&m| place(m))));
            if member.is_some() {
                valid[i * slots + s] = 1.0;
                positive[i * slots + s] = if s < np { 1.0 } else { 0.0 };
            }
        }
    }
    let z = heads
        .fused
        .forward(&pool_regions(&out.visual_tokens, out.visual.grid, &boxes)?)?; // [B + B*S, d]
    let d = z.dim(1)?;
    let anchor = z.narrow(0, 0, b)?;
    let cands = z.narrow(0, b, b * slots)?.reshape((b, slots, d))?;
    let dev = z.device();
    region_info_nce(
        &anchor,
        &cands,
        &Tensor::from_vec(positive, (b, slots), dev)?,
        Some(&Tensor::from_vec(valid, (b, slots), dev)?),
        cfg.sla.tau,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use gk_models::grounder::{BoxHead, Grounder, GrounderConfig};

    #[test]
    fn sla_offsets_are_seeded_mirror_pairs_near_and_far() {
        let o = sla_offsets("synth/train/000001");
        assert_eq!(o, sla_offsets("synth/train/000001"));
        assert_ne!(o, sla_offsets("synth/train/000002"));
        assert_eq!(o.len(), SLA_CANDIDATES);
        for pair in o.chunks(2) {
            assert_eq!(pair[1], mirror(pair[0]));
            assert!((offset_iou(pair[0]) - offset_iou(pair[1])).abs() < 1e-6);
        }
        // two near pairs (IoU > 0.45), the rest far (IoU <= 0.3): positives and negatives exist
        for (k, &c) in o.iter().enumerate() {
            let iou = offset_iou(c);
            if k < 4 {
                assert!(iou > 0.45, "near candidate {k}: IoU {iou}");
            } else {
                assert!(iou <= 0.3, "far candidate {k}: IoU {iou}");
            }
        }
        let t = [0.5, 0.5, 0.2, 0.1];
        assert_eq!(apply_offset(t, [0.0, 0.0, 1.0, 1.0]), t);
        assert_eq!(
            apply_offset(t, [1.0, -1.0, 2.0, 0.5]),
            [0.7, 0.4, 0.4, 0.05]
        );
    }

    #[test]
    fn sla_keeps_semantic_positives_and_hardest_negatives() {
        let cfg = SlaConfig {
            positives: 3,
            negatives: 2,
            margin: 0.1,
            ..SlaConfig::default()
        };
        let near = [0.05, 0.0, 1.0, 1.0]; // IoU ~0.9
        let far = [1.5, 0.0, 1.0, 1.0]; // IoU 0
        let mid = [0.45, 0.0, 1.0, 1.0]; // IoU ~0.38: neither
        let offsets = [near, near, near, far, far, far, mid];
        let scores = [0.75, 0.5, 0.8, 0.2, 0.6, 0.4, 0.9];
        let (pos, neg) = sla_select(&cfg, &offsets, &scores, 0.7);
        // candidate 1 scores 0.5 < 0.7 - 0.1: semantically off, not a positive
        assert_eq!(
            pos,
            vec![Slot::Target, Slot::Candidate(2), Slot::Candidate(0)]
        );
        assert_eq!(neg, vec![Slot::Candidate(4), Slot::Candidate(5)]);
    }

    #[test]
    fn masked_region_contrast_equals_the_contrast_without_the_empty_slots() -> Result<()> {
        let dev = Device::Cpu;
        let anchor = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
        let cands = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?;
        let pos = Tensor::new(&[[1f32, 0., 0., 0.], [1., 1., 0., 0.]], &dev)?;
        let valid = Tensor::new(&[[1f32, 1., 1., 0.], [1., 1., 1., 0.]], &dev)?;
        let masked = region_info_nce(&anchor, &cands, &pos, Some(&valid), 0.1)?;
        let kept = region_info_nce(
            &anchor,
            &cands.narrow(1, 0, 3)?,
            &pos.narrow(1, 0, 3)?,
            None,
            0.1,
        )?;
        let (m, k) = (masked.to_scalar::<f32>()?, kept.to_scalar::<f32>()?);
        assert!((m - k).abs() < 1e-5, "{m} vs {k}");
        Ok(())
    }

    /// Every distillation term on, with SLA: each student parameter and each projection gets
    /// a finite gradient, and every projection a non-zero one.
    #[test]
    fn all_terms_reach_every_projection() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let mcfg = GrounderConfig {
            head: BoxHead::Dense,
            ..GrounderConfig::tiny()
        };
        let g = Grounder::new(vb.pp("model"), &mcfg)?;
        let p = 16;
        let heads = DistillHeads::new(
            vb.pp("distill"),
            mcfg.visual_dim(),
            mcfg.text_dim(),
            mcfg.fusion.hidden,
            p,
        )?;
        let (b, s, l) = (3, mcfg.image_size, mcfg.max_text_len);
        let ids = Tensor::from_vec(
            (0..b * l).map(|i| (i % 40) as u32 + 1).collect::<Vec<_>>(),
            (b, l),
            &dev,
        )?;
        let text_mask = Tensor::ones((b, l), DType::F32, &dev)?;
        let out = g.forward(
            &Tensor::randn(0f32, 1.0, (b, 3, s, s), &dev)?,
            &Tensor::ones((b, s, s), DType::F32, &dev)?,
            &ids,
            &text_mask,
            gk_models::nn::Mode::Train { seed: 0 },
        )?;
        let target = Tensor::new(
            &[
                [0.3f32, 0.4, 0.2, 0.3],
                [0.6, 0.5, 0.3, 0.2],
                [0.5, 0.5, 0.5, 0.5],
            ],
            &dev,
        )?;
        let unit = |t: Tensor| l2_normalize(&t);
        let offsets: Vec<Vec<Offset>> = (0..b).map(|i| sla_offsets(&format!("r{i}"))).collect();
        let teacher = TeacherBatch {
            image: unit(Tensor::randn(0f32, 1.0, (b, p), &dev)?)?,
            text: unit(Tensor::randn(0f32, 1.0, (b, p), &dev)?)?,
            region: unit(Tensor::randn(0f32, 1.0, (b, p), &dev)?)?,
            scale: 10.0,
            sla: Some(SlaBatch {
                scores: vec![vec![0.5; SLA_CANDIDATES]; b],
                target: vec![0.5; b],
                offsets,
            }),
        };
        let cfg = DistillConfig {
            teacher: "t".into(),
            teacher_dim: p,
            feature: 1.0,
            feature_kind: FeatureLoss::Cosine,
            cross: 1.0,
            temperature: 2.0,
            duet_region: 1.0,
            duet_align: 1.0,
            duet_self: 1.0,
            sla: SlaConfig::default(),
            live: false,
        };
        let mut parts = crate::losses::LossParts::default();
        distill_losses(
            &cfg, &heads, &out, &text_mask, &target, &teacher, &mut parts,
        )?;
        let names: Vec<String> = parts.values()?.into_iter().map(|(n, _)| n).collect();
        for kd in TERMS {
            assert!(names.iter().any(|n| n == kd), "{kd} missing from {names:?}");
        }
        let grads = parts.total()?.backward()?;
        for (name, var) in map.data().lock().unwrap().iter() {
            let Some(gr) = grads.get(var) else {
                assert!(!name.starts_with("distill"), "{name}: no gradient");
                continue;
            };
            let a = gr.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(a.is_finite(), "{name}: gradient {a}");
            if name.starts_with("distill") {
                assert!(a > 0.0, "{name}: zero gradient");
            }
        }
        Ok(())
    }
}
