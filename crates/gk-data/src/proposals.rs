//! Region proposals for weakly supervised grounding: a small selective search.
//!
//! Our implementation of the two published steps: Felzenszwalb-Huttenlocher graph
//! segmentation (IJCV 2004; 8-neighbour RGB-distance graph on a Gaussian-smoothed image,
//! merge when the edge is no heavier than `min(Int(C) + k/|C|)` of both sides, then small
//! components absorbed) at several scales `k`, and selective search's hierarchical
//! grouping (Uijlings et al., IJCV 2013; colour-histogram intersection + size + fill
//! similarity, greedy merging of the most similar neighbours). Every segment and every
//! merge gives a box. The boxes of all scales are interleaved (each scale: segments from
//! large to small, then merges in order), near-duplicates (IoU above `dedup_iou`) and
//! boxes smaller than `min_box` of the image side dropped, and the first `max` kept.
//! Images are first shrunk to at most `max_side` pixels; boxes are pixel `xyxy` of the
//! original image. Deterministic: no random ranking.

use gk_box::Box4;
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Proposal settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalConfig {
    /// Proposals per image (CKD: R = 30).
    pub max: usize,
    /// FH scales `k` (larger: larger segments).
    pub scales: Vec<f32>,
    /// Gaussian smoothing before segmentation.
    pub sigma: f32,
    /// Segments smaller than this many pixels (at the working size) are absorbed.
    pub min_size: usize,
    /// Working size: the longer side is shrunk to this.
    pub max_side: u32,
    /// Boxes with a side below this fraction of the image's longer side are dropped.
    pub min_box: f32,
    pub dedup_iou: f32,
}

impl Default for ProposalConfig {
    fn default() -> Self {
        Self {
            max: 30,
            scales: vec![50.0, 100.0, 300.0],
            sigma: 0.8,
            min_size: 20,
            max_side: 160,
            min_box: 0.05,
            dedup_iou: 0.85,
        }
    }
}

/// Union-find with FH's internal difference per component.
struct Forest {
    parent: Vec<u32>,
    size: Vec<u32>,
    internal: Vec<f32>,
}

impl Forest {
    fn new(n: usize) -> Self {
        Self {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
            internal: vec![0.0; n],
        }
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32, w: f32) {
        let (a, b) = if self.size[a as usize] < self.size[b as usize] {
            (b, a)
        } else {
            (a, b)
        };
        self.parent[b as usize] = a;
        self.size[a as usize] += self.size[b as usize];
        self.internal[a as usize] = w;
    }
}

fn blur(img: &RgbImage, sigma: f32) -> Vec<[f32; 3]> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px: Vec<[f32; 3]> = img
        .pixels()
        .map(|p| [p[0] as f32, p[1] as f32, p[2] as f32])
        .collect();
    if sigma <= 0.0 {
        return px;
    }
    let r = (sigma * 4.0).ceil() as i64;
    let kernel: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    let pass = |src: &[[f32; 3]], horizontal: bool| -> Vec<[f32; 3]> {
        let mut out = vec![[0.0; 3]; w * h];
        for y in 0..h {
            for x in 0..w {
                let mut acc = [0.0f32; 3];
                for (j, kv) in kernel.iter().enumerate() {
                    let d = j as i64 - r;
                    let (sx, sy) = if horizontal {
                        ((x as i64 + d).clamp(0, w as i64 - 1) as usize, y)
                    } else {
                        (x, (y as i64 + d).clamp(0, h as i64 - 1) as usize)
                    };
                    let s = src[sy * w + sx];
                    for c in 0..3 {
                        acc[c] += kv * s[c];
                    }
                }
                out[y * w + x] = acc.map(|v| v / total);
            }
        }
        out
    };
    pass(&pass(&px, true), false)
}

/// FH segmentation: a component label per pixel (0..n) and n.
fn segment(px: &[[f32; 3]], w: usize, h: usize, k: f32, min_size: usize) -> (Vec<u32>, usize) {
    let mut edges: Vec<(f32, u32, u32)> = Vec::with_capacity(w * h * 4);
    let dist = |a: usize, b: usize| {
        let (p, q) = (px[a], px[b]);
        ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2)).sqrt()
    };
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let mut push = |j: usize| edges.push((dist(i, j), i as u32, j as u32));
            if x + 1 < w {
                push(i + 1);
            }
            if y + 1 < h {
                push(i + w);
                if x + 1 < w {
                    push(i + w + 1);
                }
                if x > 0 {
                    push(i + w - 1);
                }
            }
        }
    }
    edges.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut f = Forest::new(w * h);
    for &(wt, a, b) in &edges {
        let (ra, rb) = (f.find(a), f.find(b));
        if ra != rb {
            let ta = f.internal[ra as usize] + k / f.size[ra as usize] as f32;
            let tb = f.internal[rb as usize] + k / f.size[rb as usize] as f32;
            if wt <= ta.min(tb) {
                f.union(ra, rb, wt);
            }
        }
    }
    for &(_, a, b) in &edges {
        let (ra, rb) = (f.find(a), f.find(b));
        if ra != rb
            && ((f.size[ra as usize] as usize) < min_size
                || (f.size[rb as usize] as usize) < min_size)
        {
            let wt = f.internal[ra as usize].max(f.internal[rb as usize]);
            f.union(ra, rb, wt);
        }
    }
    let mut ids = vec![u32::MAX; w * h];
    let mut labels = vec![0u32; w * h];
    let mut n = 0u32;
    for (i, l) in labels.iter_mut().enumerate() {
        let r = f.find(i as u32) as usize;
        if ids[r] == u32::MAX {
            ids[r] = n;
            n += 1;
        }
        *l = ids[r];
    }
    (labels, n as usize)
}

const BINS: usize = 8;

/// A region of the grouping: box (inclusive pixel bounds), size, colour histogram.
#[derive(Clone)]
struct Region {
    bounds: [usize; 4],
    size: usize,
    hist: Vec<f32>,
}

impl Region {
    fn merge(&self, o: &Region) -> Region {
        let size = self.size + o.size;
        let hist = self
            .hist
            .iter()
            .zip(&o.hist)
            .map(|(a, b)| (a * self.size as f32 + b * o.size as f32) / size as f32)
            .collect();
        Region {
            bounds: [
                self.bounds[0].min(o.bounds[0]),
                self.bounds[1].min(o.bounds[1]),
                self.bounds[2].max(o.bounds[2]),
                self.bounds[3].max(o.bounds[3]),
            ],
            size,
            hist,
        }
    }
}

/// Selective search's similarity: colour + size + fill, each in [0, 1].
fn similarity(a: &Region, b: &Region, image: usize) -> f32 {
    let colour: f32 = a.hist.iter().zip(&b.hist).map(|(x, y)| x.min(*y)).sum();
    let size = 1.0 - (a.size + b.size) as f32 / image as f32;
    // the area of the box around both (no merged histogram needed)
    let (x1, y1) = (a.bounds[0].min(b.bounds[0]), a.bounds[1].min(b.bounds[1]));
    let (x2, y2) = (a.bounds[2].max(b.bounds[2]), a.bounds[3].max(b.bounds[3]));
    let box_area = (x2 - x1 + 1) * (y2 - y1 + 1);
    let fill = 1.0 - (box_area - a.size - b.size) as f32 / image as f32;
    colour / 3.0 + size + fill
}

/// Boxes of one scale: segments (large to small), then every merge of the grouping.
fn scale_boxes(img: &RgbImage, px: &[[f32; 3]], k: f32, min_size: usize) -> Vec<[usize; 4]> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (labels, n) = segment(px, w, h, k, min_size);
    let mut regions: Vec<Region> = vec![
        Region {
            bounds: [usize::MAX, usize::MAX, 0, 0],
            size: 0,
            hist: vec![0.0; 3 * BINS],
        };
        n
    ];
    for (i, &l) in labels.iter().enumerate() {
        let (x, y) = (i % w, i / w);
        let r = &mut regions[l as usize];
        r.bounds = [
            r.bounds[0].min(x),
            r.bounds[1].min(y),
            r.bounds[2].max(x),
            r.bounds[3].max(y),
        ];
        r.size += 1;
        let p = img.get_pixel(x as u32, y as u32);
        for c in 0..3 {
            r.hist[c * BINS + p[c] as usize * BINS / 256] += 1.0;
        }
    }
    for r in &mut regions {
        let s = r.size.max(1) as f32;
        r.hist.iter_mut().for_each(|v| *v /= s);
    }
    // neighbours
    let mut pairs = std::collections::BTreeSet::new();
    for y in 0..h {
        for x in 0..w {
            let a = labels[y * w + x];
            for (dx, dy) in [(1, 0), (0, 1)] {
                if x + dx < w && y + dy < h {
                    let b = labels[(y + dy) * w + x + dx];
                    if a != b {
                        pairs.insert((a.min(b) as usize, a.max(b) as usize));
                    }
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(regions[i].size));
    let mut out: Vec<[usize; 4]> = order.iter().map(|&i| regions[i].bounds).collect();
    // greedy grouping
    let image = w * h;
    let mut sims: Vec<(usize, usize, f32)> = pairs
        .into_iter()
        .map(|(a, b)| (a, b, similarity(&regions[a], &regions[b], image)))
        .collect();
    let mut alive = vec![true; n];
    while let Some(best) = sims
        .iter()
        .enumerate()
        .max_by(|x, y| x.1 .2.total_cmp(&y.1 .2))
        .map(|(i, _)| i)
    {
        let (a, b, _) = sims.swap_remove(best);
        let merged = regions[a].merge(&regions[b]);
        out.push(merged.bounds);
        let t = regions.len();
        regions.push(merged);
        alive[a] = false;
        alive[b] = false;
        alive.push(true);
        let mut touching = std::collections::BTreeSet::new();
        sims.retain(|&(x, y, _)| {
            if x == a || x == b || y == a || y == b {
                let other = if x == a || x == b { y } else { x };
                if other != a && other != b {
                    touching.insert(other);
                }
                false
            } else {
                true
            }
        });
        for o in touching.into_iter().filter(|&o| alive[o]) {
            sims.push((o, t, similarity(&regions[o], &regions[t], image)));
        }
    }
    out
}

fn iou(a: &Box4, b: &Box4) -> f32 {
    gk_box::iou(*a, *b).unwrap_or(0.0)
}

/// Up to `cfg.max` proposals of `image` (pixel `xyxy` of the original image).
pub fn propose(image: &RgbImage, cfg: &ProposalConfig) -> Vec<Box4> {
    let (w0, h0) = image.dimensions();
    if w0 == 0 || h0 == 0 {
        return Vec::new();
    }
    let scale = (cfg.max_side as f32 / w0.max(h0) as f32).min(1.0);
    let small;
    let img = if scale < 1.0 {
        let (w, h) = gk_box::Letterbox::scaled_size(w0, h0, scale);
        small = image::imageops::resize(image, w, h, image::imageops::FilterType::Triangle);
        &small
    } else {
        image
    };
    let px = blur(img, cfg.sigma);
    let per_scale: Vec<Vec<[usize; 4]>> = cfg
        .scales
        .iter()
        .map(|&k| scale_boxes(img, &px, k, cfg.min_size))
        .collect();
    let (sx, sy) = (
        w0 as f32 / img.width() as f32,
        h0 as f32 / img.height() as f32,
    );
    let min_side = cfg.min_box * w0.max(h0) as f32;
    let mut out: Vec<Box4> = Vec::new();
    let longest = per_scale.iter().map(Vec::len).max().unwrap_or(0);
    'fill: for i in 0..longest {
        for boxes in &per_scale {
            let Some(b) = boxes.get(i) else { continue };
            let bx = [
                b[0] as f32 * sx,
                b[1] as f32 * sy,
                ((b[2] + 1) as f32 * sx).min(w0 as f32),
                ((b[3] + 1) as f32 * sy).min(h0 as f32),
            ];
            if bx[2] - bx[0] < min_side || bx[3] - bx[1] < min_side {
                continue;
            }
            if out.iter().any(|o| iou(o, &bx) > cfg.dedup_iou) {
                continue;
            }
            out.push(bx);
            if out.len() == cfg.max {
                break 'fill;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene() -> (RgbImage, Vec<Box4>) {
        // grey noise-free background, a red square, a blue striped rectangle, a green disc
        let mut img = RgbImage::from_pixel(96, 80, image::Rgb([200, 200, 190]));
        for y in 10..30 {
            for x in 8..28 {
                img.put_pixel(x, y, image::Rgb([220, 30, 30]));
            }
        }
        for y in 40..70 {
            for x in 50..90 {
                let c = if (y / 4) % 2 == 0 {
                    [20, 40, 210]
                } else {
                    [230, 230, 240]
                };
                img.put_pixel(x, y, image::Rgb(c));
            }
        }
        for y in 0..80i32 {
            for x in 0..96i32 {
                if (x - 70).pow(2) + (y - 18).pow(2) <= 100 {
                    img.put_pixel(x as u32, y as u32, image::Rgb([30, 180, 40]));
                }
            }
        }
        let objects = vec![
            [8.0, 10.0, 28.0, 30.0],
            [50.0, 40.0, 90.0, 70.0],
            [60.0, 8.0, 81.0, 29.0],
        ];
        (img, objects)
    }

    #[test]
    fn proposals_cover_the_objects_and_respect_the_cap() {
        let (img, objects) = scene();
        let cfg = ProposalConfig::default();
        let boxes = propose(&img, &cfg);
        assert!(!boxes.is_empty() && boxes.len() <= cfg.max);
        for o in &objects {
            let best = boxes.iter().map(|b| iou(b, o)).fold(0.0, f32::max);
            assert!(best > 0.8, "object {o:?}: best IoU {best}");
        }
        for b in &boxes {
            assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 96.0 && b[3] <= 80.0);
            assert!(b[2] > b[0] && b[3] > b[1]);
        }
        // deterministic, and the cap holds
        assert_eq!(propose(&img, &cfg), boxes);
        let few = propose(
            &img,
            &ProposalConfig {
                max: 3,
                ..cfg.clone()
            },
        );
        assert_eq!(few.len(), 3);
        // the striped rectangle needs the grouping: no single small-k segment holds it
        let big = ProposalConfig {
            max_side: 48,
            ..cfg
        };
        let shrunk = propose(&img, &big);
        let best = shrunk
            .iter()
            .map(|b| iou(b, &objects[1]))
            .fold(0.0, f32::max);
        assert!(best > 0.7, "after shrinking: {best}");
    }

    #[test]
    fn empty_and_flat_images_do_not_fail() {
        assert!(propose(&RgbImage::new(0, 0), &ProposalConfig::default()).is_empty());
        let flat = RgbImage::from_pixel(40, 40, image::Rgb([9, 9, 9]));
        let b = propose(&flat, &ProposalConfig::default());
        assert_eq!(b, vec![[0.0, 0.0, 40.0, 40.0]]);
    }
}
