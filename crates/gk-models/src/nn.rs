//! Trainable building blocks composed from basic candle ops.
//!
//! candle 0.11's `LayerNorm`, `ops::layer_norm` and `ops::softmax_last_dim` pass no gradient
//! (design.md §1), so the layer norm, softmax, sigmoid and attention here are written from
//! ops that do. Every model in this crate uses these and never the fused ones.
//!
//! Dropout is seeded ([`Mode`], [`dropout`]): candle's own draws from an unseeded generator,
//! which would make a resumed run differ from an uninterrupted one.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// Layer normalisation over the last dimension, built from mean/var ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight`/`bias`, or the legacy `gamma`/`beta` names when those are present.
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let (w, b) = if !vb.contains_tensor("weight") && vb.contains_tensor("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        let weight = vb.get_with_hints(dim, w, candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, b, candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::fused::applies(x) {
            let (x, w, b) = (
                x.contiguous()?,
                self.weight.contiguous()?,
                self.bias.contiguous()?,
            );
            return x.apply_op3(
                &w,
                &b,
                crate::fused::LayerNormOp {
                    eps: self.eps as f32,
                },
            );
        }
        self.forward_composed(x)
    }
}

impl LayerNorm {
    /// The same computation from basic ops (any device; slow backward on CPU).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Softmax over the last dimension: the fused CPU kernel for f32, else the
/// differentiable composed candle op.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if crate::fused::applies(x) {
        return x.contiguous()?.apply_op1(crate::fused::SoftmaxLastOp);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// `max(x, 0)`: the fused CPU kernel for f32 (one-pass backward), else candle's op.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if crate::fused::applies(x) {
        return x.contiguous()?.apply_op1(crate::fused::ReluOp);
    }
    x.relu()
}

/// Rows scaled to unit L2 norm over the last dimension (the norm is clamped at 1e-12 so a
/// zero row stays finite).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// Mean over the tokens a mask keeps: `x [B, N, C]`, `mask [B, N]` (1 = keep) -> `[B, C]`
/// (an all-zero mask gives zeros).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?.unsqueeze(2)?; // [B, N, 1]
    x.broadcast_mul(&m)?
        .sum(1)?
        .broadcast_div(&m.sum(1)?.clamp(1.0, f64::MAX)?)
}

/// Logistic sigmoid as `0.5 * (1 + tanh(x / 2))`: finite gradient for any finite input.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

/// Activation functions by their Hugging Face config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    #[default]
    QuickGelu,
    /// Exact erf GELU (`gelu` in HF configs).
    Gelu,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu if crate::fused::applies(x) => {
                x.contiguous()?.apply_op1(crate::fused::QuickGeluOp)
            }
            Activation::QuickGelu => x * sigmoid(&(x * 1.702)?)?,
            Activation::Gelu if crate::fused::applies(x) => {
                x.contiguous()?.apply_op1(crate::fused::GeluErfOp)
            }
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluNew => x.gelu(),
            Activation::Relu => relu(x),
        }
    }
}

/// `Linear` with or without bias; bias-free linears load no `bias` key.
pub fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    if bias {
        candle_nn::linear(in_dim, out_dim, vb)
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)
    }
}

/// Additive attention bias `[B, 1, 1, L]` from a key mask `[B, L]` (1 = attend, 0 = pad).
pub fn key_padding_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    ((m - 1.0)? * 1e9)?.reshape((b, 1, 1, l))
}

/// Causal additive bias `[1, 1, L, L]`: position i attends to j <= i.
pub fn causal_bias(l: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l * l)
        .map(|k| if k % l > k / l { -1e9 } else { 0.0 })
        .collect();
    Tensor::from_vec(v, (1, 1, l, l), device)?.to_dtype(dtype)
}

/// A stride-`p` convolution with kernel `weight: [C, ch, p, p]` (no bias) as patchify +
/// matmul, equal to PyTorch's `Conv2d` (whose candle backward is very slow on CPU):
/// `pixels: [B, ch, gh*p, gw*p]` -> `[B, gh*gw, C]`, patches row-major.
pub fn patch_embed(pixels: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, ch, h, w) = pixels.dims4()?;
    let (c, _, p, _) = weight.dims4()?;
    let (gh, gw) = (h / p, w / p);
    pixels
        .reshape((b, ch, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))? // [B, gh, gw, ch, p, p]
        .contiguous()?
        .reshape((b * gh * gw, ch * p * p))?
        .matmul(&weight.reshape((c, ch * p * p))?.t()?)?
        .reshape((b, gh * gw, c))
}

/// Scaled dot-product attention over heads.
///
/// `q: [B, Lq, C]`, `k, v: [B, Lk, C]`, `bias` broadcastable to `[B, H, Lq, Lk]`;
/// returns `[B, Lq, C]` (before the output projection).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, lq, c) = q.dims3()?;
    let lk = k.dim(1)?;
    let hd = c / heads;
    let split = |t: &Tensor, l: usize| -> Result<Tensor> {
        t.reshape((b, l, heads, hd))?.transpose(1, 2)?.contiguous() // [B, H, L, hd]
    };
    let (q, k, v) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?; // [B, H, Lq, Lk]
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    let probs = softmax(&scores)?;
    probs
        .matmul(&v)? // [B, H, Lq, hd]
        .transpose(1, 2)?
        .reshape((b, lq, c))
}

/// How a forward runs: inference, or training with dropout masks drawn from a generator
/// seeded by `seed` (the trainer derives it from the run seed and the step, so a resumed
/// step draws the masks of the uninterrupted one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
}

thread_local! {
    /// The seed and the number of [`dropout`] calls so far of the [`Mode::run`] in
    /// progress on this thread (`None`: inference).
    static DROPOUT: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Restores the enclosing run's state when a [`Mode::run`] ends (or unwinds).
struct Restore(Option<(u64, u64)>);

impl Drop for Restore {
    fn drop(&mut self) {
        DROPOUT.with(|d| d.set(self.0));
    }
}

impl Mode {
    /// Runs `f` on this thread in this mode: in `Train`, the `k`-th [`dropout`] inside
    /// draws its mask from `(seed, k)`; in `Eval` none drops.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        let state = match self {
            Mode::Eval => None,
            Mode::Train { seed } => Some((seed, 0)),
        };
        let _restore = Restore(DROPOUT.with(|d| d.replace(state)));
        f()
    }
}

/// SplitMix64's output function: a well-mixed 64-bit value from a counter.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout: inside a [`Mode::Train`] run each element is zeroed with probability
/// `p` (to 1/65536) and the rest scaled by `1 / (1 - p)`; elsewhere (inference) the
/// identity. Masks are counter-based (four 16-bit draws per SplitMix64 value) and made on
/// the host: 10M elements took 51 ms here, mask and product (LoRA on every attention
/// projection draws one per set; on a GPU each mask is also an upload).
pub fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        candle_core::bail!("dropout probability {p} must be below 1");
    }
    let Some((seed, call)) = DROPOUT.with(|d| d.get()) else {
        return Ok(x.clone());
    };
    DROPOUT.with(|d| d.set(Some((seed, call + 1))));
    let key = splitmix64(seed ^ splitmix64(call));
    let threshold = (p * 65536.0).round() as u64; // drop when a 16-bit draw is below
    let keep = 1.0 / (1.0 - p);
    let n = x.elem_count();
    let mut mask = Vec::with_capacity(n + 3);
    for j in 0..n.div_ceil(4) as u64 {
        let r = splitmix64(key.wrapping_add(j));
        for lane in 0..4 {
            let draw = (r >> (16 * lane)) & 0xFFFF;
            mask.push(if draw < threshold { 0.0 } else { keep });
        }
    }
    mask.truncate(n);
    x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn dropout_is_seeded_scaled_and_off_in_eval() -> Result<()> {
        let x = Var::new(vec![1f32; 4000], &Device::Cpu)?;
        let run = |mode: Mode| mode.run(|| dropout(x.as_tensor(), 0.25)?.to_vec1::<f32>());
        assert_eq!(run(Mode::Eval)?, vec![1f32; 4000]);
        let a = run(Mode::Train { seed: 7 })?;
        assert_eq!(a, run(Mode::Train { seed: 7 })?, "same seed, same mask");
        assert_ne!(a, run(Mode::Train { seed: 8 })?);
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let dropped = a.iter().filter(|&&v| v == 0.0).count();
        assert!(
            (900..1100).contains(&dropped),
            "{dropped} of 4000 dropped at p = 0.25"
        );
        // two calls in one run draw different masks; outside any run nothing drops
        let (b, c) = Mode::Train { seed: 7 }.run(|| -> Result<_> {
            Ok((
                dropout(&x, 0.25)?.to_vec1::<f32>()?,
                dropout(&x, 0.25)?.to_vec1::<f32>()?,
            ))
        })?;
        assert_eq!(b, a);
        assert_ne!(b, c);
        assert_eq!(dropout(&x, 0.25)?.to_vec1::<f32>()?, vec![1f32; 4000]);
        // the gradient is the mask
        let y = Mode::Train { seed: 7 }.run(|| dropout(&x, 0.25))?;
        let g = y.sum_all()?.backward()?;
        assert_eq!(g.get(&x).unwrap().to_vec1::<f32>()?, a);
        Ok(())
    }

    #[test]
    fn layer_norm_matches_fused_and_has_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 8), &dev)?)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 8, &dev)?;
        let ln = LayerNorm {
            weight: w.clone(),
            bias: b.clone(),
            eps: 1e-5,
        };
        let ours = ln.forward(x.as_tensor())?;
        let fused = candle_nn::ops::layer_norm(x.as_tensor(), &w, &b, 1e-5)?;
        let err = (&ours - &fused)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "max err {err}");
        let grads = (ours.sqr()?.sum_all()?).backward()?;
        let g = grads.get(&x).expect("layer norm input gets a gradient");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn fused_kernels_equal_composed_ops_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (4, 7, 16), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 16, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 16, &dev)?)?;
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            eps: 1e-5,
        };
        let up = Tensor::randn(0f32, 1.0, (4, 7, 16), &dev)?; // a non-trivial upstream gradient
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let fused = ln.forward(x.as_tensor())?;
        let composed = ln.forward_composed(x.as_tensor())?;
        assert!(max_diff(&fused, &composed)? < 1e-5);
        let gf = (&fused * &up)?.sum_all()?.backward()?;
        let gc = (&composed * &up)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let e = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap())?;
            assert!(e < 1e-4, "layer norm gradient differs by {e}");
        }
        let qf = Activation::QuickGelu.forward(x.as_tensor())?;
        let qc = (x.as_tensor() * sigmoid(&(x.as_tensor() * 1.702)?)?)?;
        assert!(max_diff(&qf, &qc)? < 1e-5);
        let gf = (&qf * &up)?.sum_all()?.backward()?;
        let gc = (&qc * &up)?.sum_all()?.backward()?;
        assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap())? < 1e-5);
        let ef = Activation::Gelu.forward(x.as_tensor())?;
        assert!(max_diff(&ef, &x.as_tensor().gelu_erf()?)? == 0.0);
        let gf = (&ef * &up)?.sum_all()?.backward()?;
        let gc = (&x.as_tensor().gelu_erf()? * &up)?.sum_all()?.backward()?;
        assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap())? < 1e-5);
        let rf = relu(x.as_tensor())?;
        assert!(max_diff(&rf, &x.as_tensor().relu()?)? == 0.0);
        let gf = (&rf * &up)?.sum_all()?.backward()?;
        let gc = (&x.as_tensor().relu()? * &up)?.sum_all()?.backward()?;
        assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap())? == 0.0);
        let sf = softmax(x.as_tensor())?;
        let sc = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
        assert!(max_diff(&sf, &sc)? < 1e-6);
        let gf = (&sf * &up)?.sum_all()?.backward()?;
        let gc = (&sc * &up)?.sum_all()?.backward()?;
        assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap())? < 1e-5);
        Ok(())
    }

    #[test]
    fn batched_matmul_equals_its_entries_one_by_one() -> Result<()> {
        // The vendored candle spreads a batched product's entries over the threads
        // (`third_party/candle-core-matmul.patch`); attention relies on it giving the same
        // numbers as one product per entry.
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (8, 78, 32), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (8, 32, 78), &dev)?;
        let batched = a.matmul(&b)?;
        for i in 0..8 {
            let one = a.get(i)?.matmul(&b.get(i)?)?;
            let diff = (batched.get(i)? - one)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "entry {i}");
        }
        Ok(())
    }

    #[test]
    fn sigmoid_is_stable_and_differentiable() -> Result<()> {
        let x = Var::new(&[-200f32, -1.0, 0.0, 3.0, 200.0], &Device::Cpu)?;
        let y = sigmoid(x.as_tensor())?;
        let v = y.to_vec1::<f32>()?;
        assert!((v[2] - 0.5).abs() < 1e-7 && v[0] >= 0.0 && v[4] <= 1.0);
        assert!((v[1] - 0.268_941_4).abs() < 1e-6);
        let g = y.sum_all()?.backward()?.get(&x).unwrap().to_vec1::<f32>()?;
        assert!(g.iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn causal_bias_masks_the_future() -> Result<()> {
        let b = causal_bias(3, DType::F32, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(b, vec![0.0, -1e9, -1e9, 0.0, 0.0, -1e9, 0.0, 0.0, 0.0]);
        Ok(())
    }
}
