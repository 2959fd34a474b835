//! Batching and the threaded loader.
//!
//! Worker threads decode, transform and tokenise whole batches while the model trains;
//! batches come out in a fixed order. Shuffles and augmentations draw from RNGs seeded by
//! `(seed, epoch, index)`, so a run is reproducible for any worker count, and a resumed
//! run can start mid-epoch with [`Loader::epoch_from`].

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::tokenize::TextTokenizer;
use crate::transforms::{self, Prepared, TransformConfig};
use candle_core::{Device, Tensor};
use gk_box::Letterbox;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};

/// One batch. Shapes: `pixels [B, 3, S, S]`, `pixel_mask [B, S, S]` (1 = image),
/// `ids [B, L]` u32, `text_mask [B, L]` f32 (1 = token), `target [B, 4]` normalised cxcywh.
#[derive(Debug, Clone)]
pub struct Batch {
    pub pixels: Tensor,
    pub pixel_mask: Tensor,
    pub ids: Tensor,
    pub text_mask: Tensor,
    pub target: Tensor,
    /// Per sample: model frame -> pixels of the original image (eval only: train frames
    /// refer to the augmented image).
    pub frames: Vec<Letterbox>,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
    /// The expressions as tokenised (after the transform's left/right swap).
    pub exprs: Vec<String>,
    /// Whether each sample's image was mirrored.
    pub flipped: Vec<bool>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Stacks prepared samples and tokenises their expressions to `max_len`.
pub fn collate(
    items: Vec<(usize, Prepared)>,
    tok: &TextTokenizer,
    max_len: usize,
    ids_of: &dyn Fn(usize) -> String,
) -> Result<Batch> {
    let b = items.len();
    let mut ids = Vec::with_capacity(b * max_len);
    let mut mask = Vec::with_capacity(b * max_len);
    let mut target = Vec::with_capacity(b * 4);
    let (mut pix, mut pm, mut frames, mut indices) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut exprs, mut flipped) = (Vec::with_capacity(b), Vec::with_capacity(b));
    for (i, p) in items {
        let enc = tok
            .encode(&p.expr, max_len)
            .map_err(|e| DataError::Encode(format!("{}: {e}", ids_of(i))))?;
        ids.extend(enc.ids);
        mask.extend(enc.mask.iter().map(|&m| m as f32));
        target.extend(p.target);
        pix.push(p.pixels);
        pm.push(p.mask);
        frames.push(p.frame);
        indices.push(i);
        flipped.push(p.flipped);
        exprs.push(p.expr);
    }
    let dev = pix
        .first()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    Ok(Batch {
        pixels: Tensor::stack(&pix, 0)?,
        pixel_mask: Tensor::stack(&pm, 0)?,
        ids: Tensor::from_vec(ids, (b, max_len), &dev)?,
        text_mask: Tensor::from_vec(mask, (b, max_len), &dev)?,
        target: Tensor::from_vec(target, (b, 4), &dev)?,
        frames,
        indices,
        exprs,
        flipped,
    })
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    /// Decoding threads (at least 1).
    pub workers: usize,
    pub seed: u64,
    /// Apply the training augmentations of `transform`.
    pub train: bool,
    pub transform: TransformConfig,
    pub max_text_len: usize,
}

/// A stable 64-bit mix of several numbers (SplitMix64 steps) for per-sample seeds.
pub fn mix_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0x9E37_79B9_7F4A_7C15u64, |acc, &p| {
        let mut z = acc ^ p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// Produces batches of a dataset, epoch by epoch.
#[derive(Debug, Clone)]
pub struct Loader {
    ds: Arc<Dataset>,
    tok: Arc<TextTokenizer>,
    cfg: LoaderConfig,
}

impl Loader {
    pub fn new(ds: Arc<Dataset>, tok: Arc<TextTokenizer>, cfg: LoaderConfig) -> Self {
        Self { ds, tok, cfg }
    }

    pub fn dataset(&self) -> &Dataset {
        &self.ds
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tok
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.ds.len(), self.cfg.batch_size.max(1));
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of an epoch.
    fn order(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.ds.len()).collect();
        if self.cfg.shuffle {
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[
                self.cfg.seed,
                epoch,
            ])));
        }
        idx
    }

    fn make_batch(
        ds: &Dataset,
        tok: &TextTokenizer,
        cfg: &LoaderConfig,
        epoch: u64,
        indices: &[usize],
    ) -> Result<Batch> {
        let dev = Device::Cpu;
        let items = indices
            .iter()
            .map(|&i| {
                let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[cfg.seed, epoch, i as u64, 1]));
                Ok((
                    i,
                    transforms::apply(ds.get(i)?, &cfg.transform, cfg.train, &mut rng, &dev)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        collate(items, tok, cfg.max_text_len, &|i| ds.records[i].id.clone())
    }

    /// All batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> impl Iterator<Item = Result<Batch>> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch number `start` on (for resuming mid-epoch).
    pub fn epoch_from(&self, epoch: u64, start: usize) -> impl Iterator<Item = Result<Batch>> {
        let order = self.order(epoch);
        let bs = self.cfg.batch_size.max(1);
        let chunks: Vec<Vec<usize>> = order
            .chunks(bs)
            .take(self.batches_per_epoch())
            .skip(start)
            .map(<[usize]>::to_vec)
            .collect();
        let n = chunks.len();
        let chunks = Arc::new(chunks);
        let workers = self.cfg.workers.max(1);
        let (tx, rx) = mpsc::sync_channel::<(usize, Result<Batch>)>(workers * 2);
        for w in 0..workers {
            let (tx, chunks, ds, tok, cfg) = (
                tx.clone(),
                chunks.clone(),
                self.ds.clone(),
                self.tok.clone(),
                self.cfg.clone(),
            );
            std::thread::spawn(move || {
                for k in (w..chunks.len()).step_by(workers) {
                    let batch = Self::make_batch(&ds, &tok, &cfg, epoch, &chunks[k]);
                    if tx.send((k, batch)).is_err() {
                        return; // consumer gone
                    }
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, Result<Batch>> = BTreeMap::new();
        let mut next = 0;
        std::iter::from_fn(move || {
            if next >= n {
                return None;
            }
            while !pending.contains_key(&next) {
                match rx.recv() {
                    Ok((k, b)) => {
                        pending.insert(k, b);
                    }
                    Err(_) => return None,
                }
            }
            let out = pending.remove(&next);
            next += 1;
            out
        })
    }
}
