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
/// (1 = positive, 0 = negative; every row needs a positive), temperature `tau`; cosine
/// similarities; mean over anchors of `-log Σ_pos e^{s/τ} / Σ_all e^{s/τ}`.
pub fn region_info_nce(
    anchor: &Tensor,
    candidates: &Tensor,
    positive: &Tensor,
    tau: f64,
) -> Result<Tensor> {
    let n = anchor.dim(0)?;
    let a = l2_normalize(anchor)?.unsqueeze(2)?; // [N, D, 1]
    let s = (l2_normalize(candidates)?.matmul(&a)?.squeeze(2)? / tau)?; // [N, K]
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
}

fn default_temperature() -> f64 {
    2.0
}

/// The student-side projections into the teacher space (keys `distill.visual`,
/// `distill.text`, `distill.region`); trained with the student, unused at inference.
#[derive(Debug, Clone)]
pub struct DistillHeads {
    visual: candle_nn::Linear,
    text: candle_nn::Linear,
    region: candle_nn::Linear,
}

impl DistillHeads {
    pub fn new(
        vb: candle_nn::VarBuilder,
        visual_dim: usize,
        text_dim: usize,
        teacher_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            visual: candle_nn::linear(visual_dim, teacher_dim, vb.pp("visual"))?,
            text: candle_nn::linear(text_dim, teacher_dim, vb.pp("text"))?,
            region: candle_nn::linear(visual_dim, teacher_dim, vb.pp("region"))?,
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
}

/// The distillation losses of one batch that `cfg` turns on, pushed into `parts`:
/// EpmVG's `kd_visual`, `kd_text`, `kd_cross` and DUET's `kd_region`, `kd_dtext`,
/// `kd_align`. `target: [B, 4]` is the normalised cxcywh box in the model frame. The
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
    use gk_models::roi_align::{roi_align, Roi, RoiAlignConfig};
    let (gh, gw) = out.visual.grid;
    let n = out.visual.tokens.dim(1)?;
    let cells = out.visual.tokens.narrow(1, n - gh * gw, gh * gw)?; // [B, gh*gw, Cv] (no CLS)
    let rois: Vec<Roi> = target
        .to_vec2::<f32>()?
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let [x1, y1, x2, y2] = gk_box::cxcywh_to_xyxy([t[0], t[1], t[2], t[3]]);
            Roi {
                batch: i,
                xyxy: [
                    x1 * gw as f32,
                    y1 * gh as f32,
                    x2 * gw as f32,
                    y2 * gh as f32,
                ],
            }
        })
        .collect();
    let roi_cfg = RoiAlignConfig {
        output: (2, 2),
        spatial_scale: 1.0,
        sampling_ratio: 2,
        aligned: true,
    };
    let region = roi_align(&cells, (gh, gw), &rois, &roi_cfg)?.mean(1)?; // [B, Cv]
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
