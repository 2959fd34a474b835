//! Batching and the threaded loader.
//!
//! Worker threads decode, transform and tokenise whole batches while the model trains;
//! batches come out in a fixed order. Shuffles and augmentations draw from RNGs seeded by
//! `(seed, epoch, index)`, so a run is reproducible for any worker count, and a resumed
//! run can start mid-epoch with [`Loader::epoch_from`].
//!
//! A grouped loader ([`Loader::grouped`], training only) keeps each image's expressions
//! together in the shuffled order, draws one augmentation per image, and stores each
//! distinct transformed image once per batch (`Batch::image_index` maps samples to them):
//! a query-independent backbone then encodes it once for all its expressions.

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

/// One batch. Shapes: `pixels [U, 3, S, S]`, `pixel_mask [U, S, S]` (1 = image),
/// `ids [B, L]` u32, `text_mask [B, L]` f32 (1 = token), `target [B, 4]` normalised cxcywh.
/// `U = B` unless the loader is grouped.
#[derive(Debug, Clone)]
pub struct Batch {
    pub pixels: Tensor,
    pub pixel_mask: Tensor,
    /// Grouped batches: `[B]` u32, the row of `pixels` each sample reads (`None`: row = sample).
    pub image_index: Option<Tensor>,
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

    /// `[B, 3, S, S]` and `[B, S, S]`: one image per sample (a copy per sample when grouped).
    pub fn sample_pixels(&self) -> Result<(Tensor, Tensor)> {
        Ok(match &self.image_index {
            Some(ix) => (
                self.pixels.index_select(ix, 0)?,
                self.pixel_mask.index_select(ix, 0)?,
            ),
            None => (self.pixels.clone(), self.pixel_mask.clone()),
        })
    }
}

/// Stacks prepared samples and tokenises their expressions to `max_len`. With `share`,
/// samples whose `share` keys are equal and whose transformed pixels and masks are
/// bit-identical store one image (`Batch::image_index`).
pub fn collate(
    items: Vec<(usize, Prepared)>,
    tok: &TextTokenizer,
    max_len: usize,
    ids_of: &dyn Fn(usize) -> String,
    share: Option<&dyn Fn(usize) -> usize>,
) -> Result<Batch> {
    let b = items.len();
    let mut ids = Vec::with_capacity(b * max_len);
    let mut mask = Vec::with_capacity(b * max_len);
    let mut target = Vec::with_capacity(b * 4);
    let (mut pix, mut pm, mut frames, mut indices) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut exprs, mut flipped) = (Vec::with_capacity(b), Vec::with_capacity(b));
    // (share key, pixels, mask) of each stored image, and each sample's row
    let mut stored: Vec<(usize, Vec<f32>, Vec<f32>)> = Vec::new();
    let mut rows = Vec::with_capacity(b);
    for (i, p) in items {
        let enc = tok
            .encode(&p.expr, max_len)
            .map_err(|e| DataError::Encode(format!("{}: {e}", ids_of(i))))?;
        ids.extend(enc.ids);
        mask.extend(enc.mask.iter().map(|&m| m as f32));
        target.extend(p.target);
        let mut row = pix.len();
        if let Some(key_of) = share {
            let key = key_of(i);
            let (pv, mv) = (flat(&p.pixels)?, flat(&p.mask)?);
            match stored
                .iter()
                .position(|(k, sp, sm)| *k == key && *sp == pv && *sm == mv)
            {
                Some(r) => row = r,
                None => stored.push((key, pv, mv)),
            }
        }
        if row == pix.len() {
            pix.push(p.pixels);
            pm.push(p.mask);
        }
        rows.push(row as u32);
        frames.push(p.frame);
        indices.push(i);
        flipped.push(p.flipped);
        exprs.push(p.expr);
    }
    let dev = pix
        .first()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let image_index = match share {
        Some(_) => Some(Tensor::from_vec(rows, b, &dev)?),
        None => None,
    };
    Ok(Batch {
        pixels: Tensor::stack(&pix, 0)?,
        pixel_mask: Tensor::stack(&pm, 0)?,
        image_index,
        ids: Tensor::from_vec(ids, (b, max_len), &dev)?,
        text_mask: Tensor::from_vec(mask, (b, max_len), &dev)?,
        target: Tensor::from_vec(target, (b, 4), &dev)?,
        frames,
        indices,
        exprs,
        flipped,
    })
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
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
    /// Grouped loaders: per record, the first record with the same image (the key of its
    /// augmentation draw and of image sharing).
    image_key: Option<Arc<Vec<usize>>>,
}

impl Loader {
    pub fn new(ds: Arc<Dataset>, tok: Arc<TextTokenizer>, cfg: LoaderConfig) -> Self {
        Self {
            ds,
            tok,
            cfg,
            image_key: None,
        }
    }

    /// The same loader with image grouping on or off: shuffled images (not samples), each
    /// image's samples consecutive, one augmentation draw per image, each distinct image
    /// stored once per batch. The number of batches per epoch does not change.
    pub fn grouped(mut self, on: bool) -> Self {
        self.image_key = on.then(|| {
            let mut first: std::collections::HashMap<&str, usize> = Default::default();
            let keys = (self.ds.records.iter().enumerate())
                .map(|(i, r)| *first.entry(r.image.as_str()).or_insert(i))
                .collect();
            Arc::new(keys)
        });
        self
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
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[self.cfg.seed, epoch]));
        if let Some(keys) = &self.image_key {
            // groups in order of first appearance, records in file order within a group
            let mut slot: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (i, &k) in keys.iter().enumerate() {
                slot.entry(k).or_default().push(i);
            }
            let mut groups: Vec<Vec<usize>> = slot.into_values().collect();
            if self.cfg.shuffle {
                groups.shuffle(&mut rng);
            }
            return groups.concat();
        }
        let mut idx: Vec<usize> = (0..self.ds.len()).collect();
        if self.cfg.shuffle {
            idx.shuffle(&mut rng);
        }
        idx
    }

    fn make_batch(
        ds: &Dataset,
        tok: &TextTokenizer,
        cfg: &LoaderConfig,
        image_key: Option<&[usize]>,
        epoch: u64,
        indices: &[usize],
    ) -> Result<Batch> {
        let dev = Device::Cpu;
        let items = indices
            .iter()
            .map(|&i| {
                let key = image_key.map_or(i, |k| k[i]);
                let mut rng =
                    ChaCha8Rng::seed_from_u64(mix_seed(&[cfg.seed, epoch, key as u64, 1]));
                Ok((
                    i,
                    transforms::apply(ds.get(i)?, &cfg.transform, cfg.train, &mut rng, &dev)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let key_of = |i: usize| image_key.map_or(i, |k| k[i]);
        let share: Option<&dyn Fn(usize) -> usize> = image_key.map(|_| &key_of as _);
        collate(
            items,
            tok,
            cfg.max_text_len,
            &|i| ds.records[i].id.clone(),
            share,
        )
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
            let (tx, chunks, ds, tok, cfg, keys) = (
                tx.clone(),
                chunks.clone(),
                self.ds.clone(),
                self.tok.clone(),
                self.cfg.clone(),
                self.image_key.clone(),
            );
            std::thread::spawn(move || {
                for k in (w..chunks.len()).step_by(workers) {
                    let batch = Self::make_batch(
                        &ds,
                        &tok,
                        &cfg,
                        keys.as_deref().map(|v| &v[..]),
                        epoch,
                        &chunks[k],
                    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::LoadOptions;
    use crate::synth::{generate, SynthConfig};

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        let n = t.dim(0).unwrap();
        t.reshape((n, ())).unwrap().to_vec2().unwrap()
    }

    /// Grouped loading: every record once per epoch, an image's records consecutive, one
    /// stored image per distinct image of a batch shared by its samples (same flip, same
    /// pixels as a per-sample copy), deterministic, and resumable mid-epoch.
    #[test]
    fn grouped_batches_keep_images_together_and_store_each_once() {
        let dir = tempfile::tempdir().unwrap();
        generate(&SynthConfig::tiny(), dir.path(), &mut |_, _| {}).unwrap();
        let ds = Dataset::load(
            &dir.path().join("train.jsonl"),
            None,
            &LoadOptions::default(),
        )
        .unwrap();
        let tok = crate::tokenize::word_level(ds.records.iter().map(|r| r.expr.as_str())).unwrap();
        let images: Vec<String> = ds.records.iter().map(|r| r.image.clone()).collect();
        let cfg = LoaderConfig {
            batch_size: 8,
            shuffle: true,
            drop_last: false,
            workers: 2,
            seed: 3,
            train: true,
            transform: TransformConfig {
                crop: 0.0,
                ..TransformConfig::train(32)
            },
            max_text_len: 20,
        };
        let loader = Loader::new(Arc::new(ds), Arc::new(tok), cfg).grouped(true);
        let batches: Vec<Batch> = loader.epoch(0).map(|b| b.unwrap()).collect();
        let order: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..images.len()).collect::<Vec<_>>());
        // each image's records form one run in the order
        let mut runs: Vec<&str> = order.iter().map(|&i| images[i].as_str()).collect();
        runs.dedup();
        let mut distinct = runs.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(runs.len(), distinct.len(), "an image's records are split");
        let mut shared = 0;
        for b in &batches {
            let ix: Vec<u32> = b.image_index.as_ref().unwrap().to_vec1().unwrap();
            let mut names: Vec<&str> = b.indices.iter().map(|&i| images[i].as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(b.pixels.dim(0).unwrap(), names.len(), "one row per image");
            let (per_sample, _) = b.sample_pixels().unwrap();
            let (stored, copies) = (rows(&b.pixels), rows(&per_sample));
            for (k, &r) in ix.iter().enumerate() {
                assert_eq!(copies[k], stored[r as usize]);
                for (j, &q) in ix.iter().enumerate() {
                    let same = images[b.indices[k]] == images[b.indices[j]];
                    assert_eq!(same, r == q);
                    if r == q {
                        assert_eq!(b.flipped[k], b.flipped[j]);
                        shared += (k != j) as usize;
                    }
                }
            }
        }
        assert!(shared > 0, "no batch shared an image");
        // the same epoch again, and resumed after its first batch
        let again: Vec<Batch> = loader.epoch_from(0, 1).map(|b| b.unwrap()).collect();
        assert_eq!(again.len(), batches.len() - 1);
        for (a, b) in again.iter().zip(&batches[1..]) {
            assert_eq!(a.indices, b.indices);
            assert_eq!(rows(&a.pixels), rows(&b.pixels));
        }
        // ungrouped: one row per sample and no index
        let plain = loader
            .clone()
            .grouped(false)
            .epoch(0)
            .next()
            .unwrap()
            .unwrap();
        assert!(plain.image_index.is_none());
        assert_eq!(plain.pixels.dim(0).unwrap(), plain.len());
    }
}
