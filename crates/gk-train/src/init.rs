//! Seeded parameter initialisation.
//!
//! candle's CPU random generator cannot be seeded, so a `VarMap` gives different initial
//! weights on every run. [`seeded_var_builder`] puts a backend in front of the `VarMap`
//! that draws each new parameter from a ChaCha stream seeded by `(seed, name)`: the same
//! seed gives the same model, whatever the construction order. Given saved tensors
//! ([`var_builder_from`]), it makes each parameter from its saved value instead, so loading
//! a run draws nothing (HiVG-B/16: 200M draws saved at every start-up).

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

struct Seeded {
    map: VarMap,
    seed: u64,
    /// Saved values: a parameter found here is made from it, not drawn.
    source: HashMap<String, Tensor>,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    gk_data::batch::mix_seed(&[seed, h])
}

fn draw(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| {
        (0..n)
            .map(|_| rng.random_range(lo..up) as f32)
            .collect::<Vec<_>>()
    };
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| {
        (0..n)
            .map(|_| {
                // Box-Muller
                let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
                (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos())
                    as f32
            })
            .collect::<Vec<_>>()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniform(rng, -b, b)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned var map".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: {:?} vs {:?}", v.shape(), s);
            }
            return Ok(v.as_tensor().clone());
        }
        let t = match self.source.get(name) {
            Some(t) if t.shape() != &s => candle_core::bail!(
                "shape mismatch for {name}: the model has {:?}, the weights {:?}",
                s,
                t.shape()
            ),
            Some(t) => t.to_dtype(dtype)?.to_device(dev)?,
            None => {
                let mut rng = ChaCha8Rng::seed_from_u64(name_seed(self.seed, name));
                Tensor::from_vec(draw(h, &s, &mut rng), s, dev)?.to_dtype(dtype)?
            }
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned var map".into()))?;
        data.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// MAE's 2-D sine-cosine position table: `[gh * gw, dim]` row-major, the first half of
/// each row encodes the row index, the second half the column (`dim` divisible by 4).
pub fn sincos_2d(gh: usize, gw: usize, dim: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let freq = |i: usize| 1.0 / 10000f64.powf(i as f64 / quarter.max(1) as f64);
    let mut out = Vec::with_capacity(gh * gw * dim);
    for y in 0..gh {
        for x in 0..gw {
            for pos in [y as f64, x as f64] {
                out.extend((0..quarter).map(|i| (pos * freq(i)).sin() as f32));
                out.extend((0..quarter).map(|i| (pos * freq(i)).cos() as f32));
            }
            out.resize(out.len() + dim - 4 * quarter, 0.0);
        }
    }
    out
}

/// Gives a freshly built grounder sine-cosine position tables instead of random ones: the
/// ViT's patch positions (CLIP backbones) and the patch rows of the fusion's `vl_pos_embed`.
/// Models trained from scratch learn localisation much sooner with them; pretrained
/// backbones keep their own tables (call this before loading pretrained weights).
pub fn sincos_positions(map: &VarMap, cfg: &gk_models::grounder::GrounderConfig) -> Result<()> {
    use gk_models::grounder::VisualConfig;
    let data = map
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned var map".into()))?;
    let set_rows = |name: &str, first_row: usize, table: Vec<f32>, dim: usize| -> Result<()> {
        let var = data
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let rows = table.len() / dim;
        let t = Tensor::from_vec(table, (rows, dim), var.device())?;
        let full = var.as_tensor();
        let n = full.dim(0)?;
        let parts = [
            full.narrow(0, 0, first_row)?,
            t,
            full.narrow(0, first_row + rows, n - first_row - rows)?,
        ];
        var.set(&Tensor::cat(&parts, 0)?)
    };
    // (table name, first patch row, grid side, width) of the backbone's own positions;
    // CLIP's row 0 is its CLS token, which the fusion also receives first.
    let d = cfg.fusion.hidden;
    // the fusion's first visual row: after [REG] and the text slots, or after [REG] alone
    let first = match cfg.layout.visual_first {
        true => 1,
        false => 1 + cfg.max_text_len,
    };
    let (name, cls, g, dim) = match &cfg.visual {
        VisualConfig::ClipVit(v) => (
            "visual.embeddings.position_embedding.weight",
            1,
            v.grid(),
            v.hidden_size,
        ),
        VisualConfig::ConvNet(c) => ("visual.position_embedding", 0, c.grid(), c.out_dim()),
        VisualConfig::Hivg(h) => (
            "visual.embeddings.position_embedding.weight",
            1,
            h.vision.grid(),
            h.vision.hidden_size,
        ),
        VisualConfig::Detr(detr) => {
            // DETR codes positions itself (sine, from the mask): only the fusion's rows
            let g = detr.grid(cfg.image_size);
            return set_rows("vl_pos_embed.weight", first, sincos_2d(g, g, d), d);
        }
        VisualConfig::QrNet(q) => {
            // no absolute positions in Swin; the fusion's visual rows hold one table per
            // token level, coarsest first (the order of the tokens)
            let grids = q.grids(cfg.image_size);
            let mut row = first;
            for &(h, w) in grids[grids.len() - q.token_levels..].iter().rev() {
                set_rows("vl_pos_embed.weight", row, sincos_2d(h, w, d), d)?;
                row += h * w;
            }
            return Ok(());
        }
    };
    set_rows(name, cls, sincos_2d(g, g, dim), dim)?;
    let fg = (cfg.visual_tokens() - cls).isqrt();
    set_rows("vl_pos_embed.weight", first + cls, sincos_2d(fg, fg, d), d)
}

/// A `VarBuilder` that creates missing parameters in `map`, seeded by `(seed, name)`.
pub fn seeded_var_builder(map: &VarMap, seed: u64, dev: &Device) -> VarBuilder<'static> {
    var_builder_from(map, seed, HashMap::new(), dev)
}

/// [`seeded_var_builder`] that makes each parameter named in `source` from its saved
/// value (the shapes must agree) and draws only the others.
pub fn var_builder_from(
    map: &VarMap,
    seed: u64,
    source: HashMap<String, Tensor>,
    dev: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Seeded {
            map: map.clone(),
            seed,
            source,
        }),
        DType::F32,
        dev.clone(),
    )
}

/// A `VarBuilder` over detached copies of `map`'s parameters (shared storage, no copy): a
/// model built from it runs inference without an autograd graph. Built on the trainable
/// variables, every intermediate of a forward stays referenced until its output is dropped
/// (QRNet Swin-S at 640 px, batch 8: over 24 GB, killed).
pub fn detached_var_builder(map: &VarMap, dev: &Device) -> VarBuilder<'static> {
    let tensors = map
        .data()
        .lock()
        .expect("var map lock")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    VarBuilder::from_tensors(tensors, DType::F32, dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gk_models::grounder::{Grounder, GrounderConfig};

    fn build(seed: u64) -> VarMap {
        let map = VarMap::new();
        Grounder::new(
            seeded_var_builder(&map, seed, &Device::Cpu),
            &GrounderConfig::tiny(),
        )
        .unwrap();
        map
    }

    #[test]
    fn detached_weights_predict_the_same_and_keep_no_graph() -> candle_core::Result<()> {
        use candle_core::{Module, Tensor};
        let (map, dev) = (VarMap::new(), Device::Cpu);
        let trained = candle_nn::linear(4, 3, seeded_var_builder(&map, 1, &dev))?;
        let frozen = candle_nn::linear(4, 3, detached_var_builder(&map, &dev))?;
        let x = Tensor::randn(0f32, 1.0, (2, 4), &dev)?;
        let (a, b) = (trained.forward(&x)?, frozen.forward(&x)?);
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        let w = map.data().lock().unwrap()["weight"].clone();
        assert!(a.sum_all()?.backward()?.get(&w).is_some());
        assert!(
            b.sum_all()?.backward()?.get(&w).is_none(),
            "a graph back to the variable"
        );
        Ok(())
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let (a, b, c) = (build(3), build(3), build(4));
        let (a, b, c) = (
            a.data().lock().unwrap(),
            b.data().lock().unwrap(),
            c.data().lock().unwrap(),
        );
        let name = "bbox_embed.layers.0.weight";
        let v = |m: &std::collections::HashMap<String, Var>| {
            m[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        assert_eq!(a.len(), b.len());
        // candle's linear asks for Kaiming-normal: std sqrt(2 / fan_in) = 0.25 for 32 -> 32
        let w = v(&a);
        let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.25).abs() < 0.03, "std {std}");
    }

    #[test]
    fn sincos_tables_fill_the_patch_rows() {
        let t = sincos_2d(2, 3, 8);
        assert_eq!(t.len(), 2 * 3 * 8);
        assert_eq!(&t[0..8], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]); // y = x = 0
        let map = build(0);
        sincos_positions(&map, &GrounderConfig::tiny()).unwrap();
        let cfg = GrounderConfig::tiny();
        let d = map.data().lock().unwrap();
        let vl = d["vl_pos_embed.weight"]
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap();
        let first_patch = 1 + cfg.max_text_len + 1;
        assert_eq!(vl[first_patch][..8], sincos_2d(4, 4, 32)[..8]);
        assert_ne!(vl[0][..4], [0.0; 4]); // [REG] row untouched
    }
}
