//! Transforms that act on the whole sample: image, box and expression together.
//!
//! Train: horizontal flip (swapping "left"/"right" words in the expression, as TransVG's
//! `RandomHorizontalFlip`), a box-preserving random crop (only for expressions without
//! spatial words, as TransVG's crop path), brightness/contrast jitter (no hue: colour
//! words must stay true), random scale of the long side and a random offset inside the
//! square (TransVG `--aug_scale --aug_translate`). Eval: a centred letterbox.
//! The result carries the [`Letterbox`] frame, the only bridge between pixel and model boxes.

use crate::dataset::Sample;
use crate::error::Result;
use crate::image_io::{self, Normalize, Resize};
use candle_core::{Device, Tensor};
use gk_box::{Box4, Letterbox};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Augmentation settings; `Default` is the eval transform at 224 px with ImageNet stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransformConfig {
    /// Square side the model sees.
    pub side: u32,
    pub normalize: Normalize,
    /// Probability of a horizontal flip (train only).
    pub flip: f32,
    /// Probability of a box-preserving crop (train only, no spatial words).
    pub crop: f32,
    /// Brightness and contrast factors are drawn from `[1 - jitter, 1 + jitter]`.
    pub jitter: f32,
    /// The long side is scaled to `side * s`, `s` in `[min_scale, 1]`.
    pub min_scale: f32,
    /// Place the image at a random offset in the square instead of centring it.
    pub translate: bool,
    /// The letterbox's resize filter (part of a model kind's preprocessing).
    #[serde(default)]
    pub resize: Resize,
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self {
            side: 224,
            normalize: Normalize::IMAGENET,
            flip: 0.0,
            crop: 0.0,
            jitter: 0.0,
            min_scale: 1.0,
            translate: false,
            resize: Resize::Triangle,
        }
    }
}

impl TransformConfig {
    /// TransVG-like training augmentation at `side`.
    pub fn train(side: u32) -> Self {
        Self {
            side,
            flip: 0.5,
            crop: 0.3,
            jitter: 0.2,
            min_scale: 0.75,
            translate: true,
            ..Self::default()
        }
    }

    /// The eval transform at `side`.
    pub fn eval(side: u32) -> Self {
        Self {
            side,
            ..Self::default()
        }
    }
}

/// A transformed sample ready for batching.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `[3, S, S]`.
    pub pixels: Tensor,
    /// `[S, S]`, 1 = image.
    pub mask: Tensor,
    /// Normalised cxcywh target in the padded square.
    pub target: Box4,
    /// Maps model boxes back to the pixels of the image the transform received.
    pub frame: Letterbox,
    /// The expression as the model sees it (left/right swapped when flipped).
    pub expr: String,
    /// Whether the image was mirrored (region offsets defined on the original mirror too).
    pub flipped: bool,
}

const SPATIAL: &[&str] = &[
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "center",
    "centre",
    "above",
    "below",
    "leftmost",
    "rightmost",
    "topmost",
    "bottommost",
    "highest",
    "lowest",
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "next",
    "beside",
    "between",
];

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

/// Whether the expression says where the object is (then cropping could change its referent).
pub fn has_spatial_words(text: &str) -> bool {
    words(text).any(|w| SPATIAL.contains(&w.to_lowercase().as_str()))
}

/// Swaps left <-> right (and leftmost <-> rightmost) as whole words, keeping the rest.
pub fn swap_left_right(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let swapped = match word.to_lowercase().as_str() {
            "left" => "right",
            "right" => "left",
            "leftmost" => "rightmost",
            "rightmost" => "leftmost",
            _ => "",
        };
        if swapped.is_empty() {
            out.push_str(word);
        } else if word.chars().next().is_some_and(char::is_uppercase) {
            let mut c = swapped.chars();
            out.extend(c.next().map(|f| f.to_ascii_uppercase()));
            out.push_str(c.as_str());
        } else {
            out.push_str(swapped);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn hflip(s: Sample) -> Sample {
    let w = s.image.width() as f32;
    let [x1, y1, x2, y2] = s.bbox;
    Sample {
        image: image::imageops::flip_horizontal(&s.image),
        expr: swap_left_right(&s.expr),
        bbox: [w - x2, y1, w - x1, y2],
    }
}

/// A random crop that keeps the whole box.
fn crop_around_box(s: Sample, rng: &mut impl Rng) -> Sample {
    let (w, h) = s.image.dimensions();
    let [x1, y1, x2, y2] = s.bbox;
    let cx0 = rng.random_range(0.0..=x1.max(0.0)).floor() as u32;
    let cy0 = rng.random_range(0.0..=y1.max(0.0)).floor() as u32;
    let cx1 = (rng.random_range(x2.min(w as f32)..=w as f32).ceil() as u32).clamp(cx0 + 1, w);
    let cy1 = (rng.random_range(y2.min(h as f32)..=h as f32).ceil() as u32).clamp(cy0 + 1, h);
    let image = image::imageops::crop_imm(&s.image, cx0, cy0, cx1 - cx0, cy1 - cy0).to_image();
    let (dx, dy) = (cx0 as f32, cy0 as f32);
    Sample {
        image,
        expr: s.expr,
        bbox: [x1 - dx, y1 - dy, x2 - dx, y2 - dy],
    }
}

fn jitter(img: &mut RgbImage, amount: f32, rng: &mut impl Rng) {
    let b = rng.random_range(1.0 - amount..=1.0 + amount);
    let c = rng.random_range(1.0 - amount..=1.0 + amount);
    let n = (img.width() * img.height()) as f32;
    let mean = img
        .pixels()
        .map(|p| (p[0] as f32 + p[1] as f32 + p[2] as f32) / 3.0)
        .sum::<f32>()
        / n.max(1.0)
        * b;
    for p in img.pixels_mut() {
        for v in p.0.iter_mut() {
            *v = ((*v as f32 * b - mean) * c + mean)
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
}

/// Applies the transform; `train = false` (or all probabilities 0) is the eval path.
pub fn apply(
    sample: Sample,
    cfg: &TransformConfig,
    train: bool,
    rng: &mut impl Rng,
    dev: &Device,
) -> Result<Prepared> {
    let mut s = sample;
    let flipped = train && rng.random::<f32>() < cfg.flip;
    if flipped {
        s = hflip(s);
    }
    // The crop's draws come from their own stream, drawn for every training sample: the
    // draws after it do not depend on the expression or the box, so the expressions of one
    // image seeded alike get one image (grouped batches share it).
    let crop = train && rng.random::<f32>() < cfg.crop;
    let crop_seed: u64 = if train { rng.random() } else { 0 };
    if crop && !has_spatial_words(&s.expr) {
        s = crop_around_box(s, &mut rand_chacha::ChaCha8Rng::seed_from_u64(crop_seed));
    }
    if train && cfg.jitter > 0.0 {
        jitter(&mut s.image, cfg.jitter, rng);
    }
    let (w, h) = s.image.dimensions();
    let frame = if train && (cfg.min_scale < 1.0 || cfg.translate) {
        let scale_f = if cfg.min_scale < 1.0 {
            rng.random_range(cfg.min_scale..=1.0)
        } else {
            1.0
        };
        let scale = cfg.side as f32 * scale_f / w.max(h) as f32;
        let (nw, nh) = Letterbox::scaled_size(w, h, scale);
        let (nw, nh) = (nw.min(cfg.side), nh.min(cfg.side));
        let (px, py) = if cfg.translate {
            (
                rng.random_range(0..=cfg.side - nw),
                rng.random_range(0..=cfg.side - nh),
            )
        } else {
            ((cfg.side - nw) / 2, (cfg.side - nh) / 2)
        };
        Letterbox {
            side: cfg.side,
            scale,
            pad_x: px as f32,
            pad_y: py as f32,
            width: nw,
            height: nh,
        }
    } else {
        Letterbox::centred(w, h, cfg.side)
    };
    let lb = image_io::letterbox_with(&s.image, frame, cfg.resize, &cfg.normalize, dev)?;
    let target = gk_box::clamp(frame.to_model(s.bbox), 0.0, 1.0);
    Ok(Prepared {
        pixels: lb.pixels,
        mask: lb.mask,
        target,
        frame,
        expr: s.expr,
        flipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn sample() -> Sample {
        let mut image = RgbImage::from_pixel(80, 50, image::Rgb([20, 20, 20]));
        for y in 10..30 {
            for x in 5..25 {
                image.put_pixel(x, y, image::Rgb([250, 0, 0]));
            }
        }
        Sample {
            image,
            expr: "the red square on the Left, left-most".into(),
            bbox: [5.0, 10.0, 25.0, 30.0],
        }
    }

    #[test]
    fn flip_swaps_words_and_box() {
        assert_eq!(
            swap_left_right("the man on the Left, right of leftmost"),
            "the man on the Right, left of rightmost"
        );
        assert_eq!(swap_left_right("leftover bright"), "leftover bright");
        let f = hflip(sample());
        assert_eq!(f.bbox, [55.0, 10.0, 75.0, 30.0]);
        assert_eq!(f.image.get_pixel(60, 15)[0], 250);
        assert!(f.expr.contains("Right"));
    }

    #[test]
    fn box_invariants_hold_under_random_train_transforms() {
        let cfg = TransformConfig {
            crop: 1.0,
            ..TransformConfig::train(64)
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for i in 0..200 {
            let mut s = sample();
            if i % 2 == 0 {
                s.expr = "the red square".into(); // crop allowed
            }
            let p = apply(s, &cfg, true, &mut rng, &Device::Cpu).unwrap();
            let [cx, cy, w, h] = p.target;
            assert!(w > 0.0 && h > 0.0 && w <= 1.0 && h <= 1.0, "{:?}", p.target);
            assert!((0.0..=1.0).contains(&cx) && (0.0..=1.0).contains(&cy));
            // the box still covers red pixels: sample the centre of the target in the tensor
            let s = cfg.side as f32;
            let (x, y) = ((cx * s) as usize, (cy * s) as usize);
            let px = |c: usize| {
                p.pixels
                    .get(c)
                    .unwrap()
                    .get(y)
                    .unwrap()
                    .get(x)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let redness = px(0) - px(1); // normalised red minus green: ~2.5 on the square, ~0 elsewhere
            assert!(
                redness > 1.0,
                "iteration {i}: centre pixel is not red ({redness}), frame {:?}",
                p.frame
            );
            let m = p
                .mask
                .get(y)
                .unwrap()
                .get(x)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(m, 1.0);
        }
    }

    #[test]
    fn eval_transform_round_trips_the_box() {
        let s = sample();
        let b = s.bbox;
        let p = apply(
            s,
            &TransformConfig::eval(64),
            false,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
            &Device::Cpu,
        )
        .unwrap();
        let back = p.frame.to_image(p.target);
        assert!(
            back.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-3),
            "{back:?}"
        );
    }

    #[test]
    fn crop_only_without_spatial_words() {
        assert!(has_spatial_words("the second circle from the LEFT"));
        assert!(!has_spatial_words("the small red circle"));
    }
}
