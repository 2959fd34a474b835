//! Layer norm, last-dimension softmax, QuickGELU, erf GELU, ReLU and the conv net's unfold
//! as CPU custom ops **with** hand-written backward.
//!
//! Composed from basic candle ops these are correct but their backward is slow on CPU
//! (a layer norm over `[32, 86, 128]`: 1 ms forward, 20 ms backward, most of a training
//! step). These kernels do one pass per row, in parallel over rows, for `f32` contiguous
//! CPU tensors; [`crate::nn`] falls back to the composed versions on other devices.
//! Both are checked against the composed versions, values and gradients, in the tests.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, StorageRef, Tensor,
};
use rayon::prelude::*;

/// Whether these kernels take `x` (f32 on the CPU); callers fall back to composed ops otherwise.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op needs a contiguous tensor"),
    }
}

/// A contiguous CPU tensor's f32 data, borrowed from its storage guard (no copy).
fn host<'a>(g: &'a (StorageRef<'_>, &Layout)) -> Result<&'a [f32]> {
    match &*g.0 {
        Storage::Cpu(s) => slice(s, g.1),
        _ => candle_core::bail!("fused op backward needs a CPU tensor"),
    }
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension.
pub struct LayerNormOp {
    pub eps: f32,
}

fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "gk-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let c = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(o, row)| {
                let (mean, rstd) = row_stats(row, self.eps);
                for k in 0..c {
                    o[k] = (row[k] - mean) * rstd * w[k] + b[k];
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
        let (gx, gw, gdy) = (
            x.storage_and_layout(),
            w.storage_and_layout(),
            dy.storage_and_layout(),
        );
        let (xs, ws, dys) = (host(&gx)?, host(&gw)?, host(&gdy)?);
        let c = ws.len();
        let mut dx = vec![0f32; xs.len()];
        // Rows go in fixed blocks; each block returns its dw/db partial sums, added in block
        // order: the result does not depend on how rayon schedules the blocks (bit-exact resume).
        const ROWS: usize = 64;
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(c * ROWS)
            .zip(xs.par_chunks(c * ROWS).zip(dys.par_chunks(c * ROWS)))
            .map(|(dxb, (xb, dyb))| {
                let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
                for (dxr, (row, dyr)) in dxb.chunks_mut(c).zip(xb.chunks(c).zip(dyb.chunks(c))) {
                    let (mean, rstd) = row_stats(row, self.eps);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for k in 0..c {
                        let xhat = (row[k] - mean) * rstd;
                        let g = dyr[k] * ws[k];
                        m1 += g;
                        m2 += g * xhat;
                        dw[k] += dyr[k] * xhat;
                        db[k] += dyr[k];
                    }
                    let (m1, m2) = (m1 / c as f32, m2 / c as f32);
                    for k in 0..c {
                        let xhat = (row[k] - mean) * rstd;
                        dxr[k] = rstd * (dyr[k] * ws[k] - m1 - xhat * m2);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
        for (pw, pb) in partial {
            for k in 0..c {
                dw[k] += pw[k];
                db[k] += pb[k];
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// Softmax over the last dimension.
pub struct SoftmaxLastOp;

impl CustomOp1 for SoftmaxLastOp {
    fn name(&self) -> &'static str {
        "gk-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let c = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(o, row)| {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for k in 0..c {
                    o[k] = (row[k] - m).exp();
                    sum += o[k];
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (y, dy) = (y.contiguous()?, dy.contiguous()?);
        let (gy, gdy) = (y.storage_and_layout(), dy.storage_and_layout());
        let (ys, dys) = (host(&gy)?, host(&gdy)?);
        let c = x.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; ys.len()];
        dx.par_chunks_mut(c)
            .zip(ys.par_chunks(c).zip(dys.par_chunks(c)))
            .for_each(|(d, (yr, gr))| {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for k in 0..c {
                    d[k] = yr[k] * (gr[k] - dot);
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// An element-wise op's forward: `f` over a contiguous f32 CPU tensor, in parallel chunks.
fn map_fwd(
    s: &CpuStorage,
    l: &Layout,
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<(CpuStorage, Shape)> {
    let x = slice(s, l)?;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(o, xs)| {
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = f(v);
            }
        });
    Ok((CpuStorage::F32(out), l.shape().clone()))
}

/// An element-wise op's backward `dx = grad(saved, dy)`, `saved` being the op's input or
/// output (whichever its derivative is written in), read in place.
fn map_bwd(
    saved: &Tensor,
    dy: &Tensor,
    grad: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Option<Tensor>> {
    let (saved, dy) = (saved.contiguous()?, dy.contiguous()?);
    let (gs, gdy) = (saved.storage_and_layout(), dy.storage_and_layout());
    let (ss, dys) = (host(&gs)?, host(&gdy)?);
    let mut dx = vec![0f32; ss.len()];
    dx.par_chunks_mut(4096)
        .zip(ss.par_chunks(4096).zip(dys.par_chunks(4096)))
        .for_each(|(d, (sr, gr))| {
            for k in 0..d.len() {
                d[k] = grad(sr[k], gr[k]);
            }
        });
    Ok(Some(Tensor::from_vec(dx, saved.shape(), saved.device())?))
}

/// `x * sigmoid(1.702 x)` (OpenAI CLIP's QuickGELU) in one pass, with its derivative
/// `s + 1.702 x s (1 - s)` in the backward.
pub struct QuickGeluOp;

fn quick_sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-1.702 * x).exp())
}

impl CustomOp1 for QuickGeluOp {
    fn name(&self) -> &'static str {
        "gk-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_fwd(s, l, |v| v * quick_sigmoid(v))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        map_bwd(x, dy, |v, g| {
            let s = quick_sigmoid(v);
            g * (s + 1.702 * v * s * (1.0 - s))
        })
    }
}

/// Exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))` as candle computes it, with the
/// derivative `0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)` in one pass
/// (candle's composed backward for it is seven full-size temporaries).
pub struct GeluErfOp;

fn erf_half(x: f32) -> f32 {
    candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "gk-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_fwd(s, l, |v| (erf_half(v) + 1.) * 0.5 * v)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        map_bwd(x, dy, |v, g| {
            let pdf = INV_SQRT_2PI * (-0.5 * v * v).exp();
            g * (0.5 * (1.0 + erf_half(v)) + v * pdf)
        })
    }
}

/// `max(x, 0)` with the backward `dy * (y > 0)` in one pass (candle's composed ReLU backward
/// is a compare, a cast and a multiply, each a full-size temporary).
pub struct ReluOp;

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "gk-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_fwd(s, l, |v| v.max(0.0))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        map_bwd(y, dy, |v, g| if v > 0.0 { g } else { 0.0 })
    }
}

/// Unfold for a `k x k`, stride-1, zero-padded ("same") convolution on channels-last
/// tokens: `[B, H, W, C]` -> `[B, H, W, k*k*C]`, column `(ky*k + kx)*C + c` holding
/// `x[b, y+ky-k/2, x+kx-k/2, c]` (0 outside). One pass instead of k*k strided copies and a
/// concatenation; the backward gathers (col2im) per output element, so it is deterministic.
pub struct Unfold {
    pub k: usize,
}

impl Unfold {
    fn dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
        l.shape().dims4()
    }
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "gk-unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (b, h, w, c) = Self::dims(l)?;
        let (k, r) = (self.k, self.k / 2);
        let kc = k * k * c;
        let mut out = vec![0f32; b * h * w * kc];
        // one output row (b, y) per task
        out.par_chunks_mut(w * kc).enumerate().for_each(|(by, o)| {
            let (n, y) = (by / h, by % h);
            for ky in 0..k {
                let iy = y + ky;
                if iy < r || iy - r >= h {
                    continue;
                }
                let src_row = &x[(n * h + iy - r) * w * c..][..w * c];
                for ox in 0..w {
                    for kx in 0..k {
                        let ix = ox + kx;
                        if ix < r || ix - r >= w {
                            continue;
                        }
                        let dst = ox * kc + (ky * k + kx) * c;
                        o[dst..dst + c].copy_from_slice(&src_row[(ix - r) * c..][..c]);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, kc))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, w, c) = x.dims4()?;
        let dy = dy.contiguous()?;
        let gdy = dy.storage_and_layout();
        let g = host(&gdy)?;
        let (k, r) = (self.k, self.k / 2);
        let kc = k * k * c;
        let mut dx = vec![0f32; b * h * w * c];
        // dx[b, iy, ix] = sum over (ky, kx) of dy[b, iy + r - ky, ix + r - kx, (ky, kx)]
        dx.par_chunks_mut(w * c).enumerate().for_each(|(by, d)| {
            let (n, iy) = (by / h, by % h);
            for ky in 0..k {
                let y = iy + r;
                if y < ky || y - ky >= h {
                    continue;
                }
                let g_row = &g[(n * h + y - ky) * w * kc..][..w * kc];
                for ix in 0..w {
                    for kx in 0..k {
                        let xx = ix + r;
                        if xx < kx || xx - kx >= w {
                            continue;
                        }
                        let src = &g_row[(xx - kx) * kc + (ky * k + kx) * c..][..c];
                        for (dv, gv) in d[ix * c..(ix + 1) * c].iter_mut().zip(src) {
                            *dv += gv;
                        }
                    }
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
