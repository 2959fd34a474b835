//! The embedded procedural grounding benchmark (design §4).
//!
//! Owns everything about the synthetic data set: scene sampling and hand-written
//! rasterisation, the structured referring-expression queries and their semantics
//! ([`Query::evaluate`]), paraphrased surface text, the split policy (RefCOCO-style
//! `train`/`val`/`testA`/`testB` plus `heldout` colour–shape combinations) and the on-disk
//! layout (`{split}.jsonl` of [`Record`]s with their phrases and a box per phrase, PNG
//! images, `objects.jsonl`, `captions.jsonl`, `labels.json` (the shapes as detector classes
//! with their synonyms, for the weakly supervised path), `meta.json`). Output is a pure function of [`SynthConfig`]: every scene draws from its
//! own ChaCha8 stream keyed by (seed, split, scene attempt), so files are byte-identical
//! across runs.
//!
//! An expression is emitted only if its query denotes exactly its target. Spatial words are
//! the literal `left`/`right` (also inside `leftmost`/`rightmost`), so swapping those
//! substrings is a valid horizontal-flip rewrite; no other word contains them.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::record::Record;

/// Version string written to `meta.json`; bump when output for a given config changes.
pub const GENERATOR_VERSION: &str = "gk-synth/2";
/// Number of (colour, shape) combinations reserved for the `heldout` split.
const HELDOUT_COMBOS: usize = 4;
/// Expressions drawn per scene (each with a different target).
const PER_SCENE: usize = 3;
/// Spatial margin (fraction of the image side) for extremes, ranks and relations.
const MARGIN: f32 = 0.08;
/// Area ratio a superlative must win by.
const AREA_RATIO: f32 = 1.5;
/// Consecutive empty scenes after which a split is declared impossible.
const MAX_EMPTY_SCENES: usize = 1000;

/// Size and seed of a generated benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthConfig {
    pub seed: u64,
    /// Side of the square images in pixels.
    pub image_size: u32,
    /// Number of expressions (records) per split.
    pub train: usize,
    pub val: usize,
    pub test_a: usize,
    pub test_b: usize,
    pub heldout: usize,
    /// Objects per scene, inclusive range.
    pub min_objects: usize,
    pub max_objects: usize,
}

impl SynthConfig {
    /// Demo size: 6000/500/250/250/250 expressions on 128 px images.
    pub fn small() -> Self {
        Self {
            seed: 1,
            image_size: 128,
            train: 6000,
            val: 500,
            test_a: 250,
            test_b: 250,
            heldout: 250,
            min_objects: 3,
            max_objects: 6,
        }
    }

    /// Test size: 40/10/10/10/10 expressions on 64 px images.
    pub fn tiny() -> Self {
        Self {
            seed: 1,
            image_size: 64,
            train: 40,
            val: 10,
            test_a: 10,
            test_b: 10,
            heldout: 10,
            min_objects: 3,
            max_objects: 6,
        }
    }

    fn validate(&self) -> Result<(), SynthError> {
        if !(48..=2048).contains(&self.image_size) {
            return Err(SynthError::Config(format!(
                "image_size {} outside 48..=2048",
                self.image_size
            )));
        }
        if self.min_objects < 2 || self.max_objects < self.min_objects || self.max_objects > 10 {
            return Err(SynthError::Config(format!(
                "objects per scene {}..={} must satisfy 2 <= min <= max <= 10",
                self.min_objects, self.max_objects
            )));
        }
        Ok(())
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSummary {
    /// Records per split, in output order.
    pub splits: Vec<(String, usize)>,
    /// Images written over all splits.
    pub images: usize,
    /// Records per expression type over all splits.
    pub by_type: BTreeMap<String, usize>,
}

/// Errors from [`generate`]; I/O errors name the path involved.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write image {path}: {source}")]
    Image {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("cannot serialise JSON to {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid synth config: {0}")]
    Config(String),
}

macro_rules! attribute {
    ($(#[$m:meta])* $name:ident { $($var:ident => [$($word:literal),+]),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        enum $name { $($var),+ }
        impl $name {
            const ALL: &'static [$name] = &[$($name::$var),+];
            /// Canonical name (first word) followed by synonyms.
            fn words(self) -> &'static [&'static str] {
                match self { $($name::$var => &[$($word),+]),+ }
            }
            fn name(self) -> &'static str {
                self.words()[0]
            }
        }
    };
}

attribute!(Shape { Circle => ["circle", "disc"], Square => ["square", "block"], Triangle => ["triangle"], Star => ["star"], Diamond => ["diamond", "rhombus"] });
attribute!(Colour { Red => ["red", "crimson"], Green => ["green"], Blue => ["blue"], Yellow => ["yellow", "golden"], Purple => ["purple", "violet"], Orange => ["orange"] });
attribute!(Size { Small => ["small", "tiny", "little"], Large => ["large", "big", "huge"] });
attribute!(Texture { Plain => ["plain", "solid"], Striped => ["striped", "stripy"] });

/// Generic nouns used when the shape is not part of a description.
const GENERIC: &[&str] = &["shape", "object", "thing"];
const RANKS: &[&str] = &["first", "second", "third", "fourth"];

/// Unit-radius outlines (y down) for the polygonal shapes.
const TRIANGLE: [(f32, f32); 3] = [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)];
const STAR: [(f32, f32); 10] = [
    (0.0, -1.0),
    (0.2645, -0.3641),
    (0.9511, -0.309),
    (0.428, 0.1391),
    (0.5878, 0.809),
    (0.0, 0.45),
    (-0.5878, 0.809),
    (-0.428, 0.1391),
    (-0.9511, -0.309),
    (-0.2645, -0.3641),
];

impl Shape {
    /// Point-in-shape test in unit-radius coordinates centred on the object.
    fn contains(self, x: f32, y: f32) -> bool {
        match self {
            Shape::Circle => x * x + y * y <= 1.0,
            Shape::Square => x.abs().max(y.abs()) <= 0.8,
            Shape::Diamond => x.abs() + y.abs() <= 1.0,
            Shape::Triangle => in_polygon(&TRIANGLE, x, y),
            Shape::Star => in_polygon(&STAR, x, y),
        }
    }
}

impl Colour {
    /// Saturated and well separated from each other and from the greyish backgrounds.
    fn rgb(self) -> [u8; 3] {
        [
            [215, 40, 40],
            [40, 170, 60],
            [40, 90, 225],
            [235, 215, 40],
            [150, 60, 200],
            [245, 135, 25],
        ][self as usize]
    }
}

/// Even-odd crossing test.
fn in_polygon(pts: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for (i, &(xi, yi)) in pts.iter().enumerate() {
        let (xj, yj) = pts[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// A (colour, shape) pair; the unit of the held-out split.
type Combo = (Colour, Shape);

/// One rendered object; geometry is measured from its own rasterised pixels.
#[derive(Debug, Clone)]
struct Object {
    shape: Shape,
    colour: Colour,
    size: Size,
    texture: Texture,
    /// Tight pixel box `[x1, y1, x2, y2)`.
    bbox: [u32; 4],
    /// Number of pixels covered.
    area: u32,
}

impl Object {
    fn combo(&self) -> Combo {
        (self.colour, self.shape)
    }
    fn centre(&self) -> (f32, f32) {
        let b = self.bbox;
        ((b[0] + b[2]) as f32 / 2.0, (b[1] + b[3]) as f32 / 2.0)
    }
}

/// The objects of one image; what queries are evaluated against.
#[derive(Debug, Clone)]
struct Scene {
    size: u32,
    objects: Vec<Object>,
}

impl Scene {
    fn margin(&self) -> f32 {
        MARGIN * self.size as f32
    }
}

/// Draws a low-contrast greyish background: blocky noise, stripes or a gradient.
fn background(rng: &mut ChaCha8Rng, s: u32) -> RgbImage {
    let grey = rng.random_range(85.0..170.0f32);
    let base: [f32; 3] = std::array::from_fn(|_| grey + rng.random_range(-10.0..10.0f32));
    let offset: Box<dyn Fn(u32, u32) -> f32> = match rng.random_range(0..3) {
        0 => {
            let cell = rng.random_range(2..=6u32);
            let cols = s / cell + 1;
            let grid: Vec<f32> = (0..cols * cols)
                .map(|_| rng.random_range(-12.0..12.0f32))
                .collect();
            Box::new(move |x, y| grid[((y / cell) * cols + x / cell) as usize])
        }
        1 => {
            let half = rng.random_range(3..=8u32);
            let amp = rng.random_range(6.0..12.0f32);
            let orient = rng.random_range(0..4);
            Box::new(move |x, y| {
                let t = [x, y, x + y, x + s - y][orient];
                if (t / half).is_multiple_of(2) {
                    amp
                } else {
                    -amp
                }
            })
        }
        _ => {
            let angle = rng.random_range(0.0..std::f32::consts::TAU);
            let (dx, dy) = (angle.cos() * 40.0 / s as f32, angle.sin() * 40.0 / s as f32);
            let c = s as f32 / 2.0;
            Box::new(move |x, y| (x as f32 - c) * dx + (y as f32 - c) * dy)
        }
    };
    RgbImage::from_fn(s, s, |x, y| {
        let o = offset(x, y);
        Rgb(base.map(|v| (v + o).clamp(0.0, 255.0) as u8))
    })
}

/// An object before rasterisation (box and area still zero) with nominal centre and radius.
struct Placement {
    obj: Object,
    cx: f32,
    cy: f32,
    r: f32,
}

impl Placement {
    fn nominal_box(&self) -> [f32; 4] {
        [
            self.cx - self.r,
            self.cy - self.r,
            self.cx + self.r,
            self.cy + self.r,
        ]
    }
}

/// Overlap of two boxes as a fraction of the smaller one.
fn overlap_of_smaller(a: [f32; 4], b: [f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |q: [f32; 4]| (q[2] - q[0]) * (q[3] - q[1]);
    w * h / area(a).min(area(b))
}

/// Samples attributes and non-overlapping positions; `forced` fixes the first combo.
fn place_objects(
    rng: &mut ChaCha8Rng,
    cfg: &SynthConfig,
    forced: Option<Combo>,
) -> Result<Vec<Placement>, SynthError> {
    let s = cfg.image_size as f32;
    for _ in 0..100 {
        let n = rng.random_range(cfg.min_objects..=cfg.max_objects);
        let mut placed: Vec<Placement> = Vec::with_capacity(n);
        'objects: for i in 0..n {
            let (colour, shape) = match forced.filter(|_| i == 0) {
                Some(c) => c,
                None => (
                    *Colour::ALL.choose(rng).expect("non-empty constant list"),
                    *Shape::ALL.choose(rng).expect("non-empty constant list"),
                ),
            };
            let size = *Size::ALL.choose(rng).expect("non-empty constant list");
            let texture = Texture::ALL[usize::from(rng.random_bool(0.25))]; // 25% striped
            let base = if size == Size::Large { 0.115 } else { 0.06 };
            let r = base * s * rng.random_range(0.92..1.08f32);
            for _ in 0..100 {
                let cx = rng.random_range(r + 1.0..s - r - 1.0);
                let cy = rng.random_range(r + 1.0..s - r - 1.0);
                let obj = Object {
                    shape,
                    colour,
                    size,
                    texture,
                    bbox: [0; 4],
                    area: 0,
                };
                let p = Placement { obj, cx, cy, r };
                if placed
                    .iter()
                    .all(|q| overlap_of_smaller(q.nominal_box(), p.nominal_box()) <= 0.1)
                {
                    placed.push(p);
                    continue 'objects;
                }
            }
            break;
        }
        if placed.len() >= cfg.min_objects {
            return Ok(placed);
        }
    }
    Err(SynthError::Config(format!(
        "{} objects do not fit in {} px images",
        cfg.min_objects, cfg.image_size
    )))
}

/// Rasterises one object (pixel-centre point-in-shape test) and measures it.
fn paint(img: &mut RgbImage, p: Placement) -> Object {
    let s = img.width();
    let colour = p.obj.colour.rgb();
    let dark = colour.map(|c| (c as f32 * 0.55) as u8);
    let stripe = ((p.r / 3.0) as u32).max(2);
    let lo = |v: f32| (v - p.r - 1.0).max(0.0) as u32;
    let hi = |v: f32| ((v + p.r + 2.0) as u32).min(s);
    let (mut bbox, mut area) = ([u32::MAX, u32::MAX, 0, 0], 0);
    for y in lo(p.cy)..hi(p.cy) {
        for x in lo(p.cx)..hi(p.cx) {
            let (ux, uy) = ((x as f32 + 0.5 - p.cx) / p.r, (y as f32 + 0.5 - p.cy) / p.r);
            if !p.obj.shape.contains(ux, uy) {
                continue;
            }
            let striped = p.obj.texture == Texture::Striped && ((x + y) / stripe) % 2 == 1;
            img.put_pixel(x, y, Rgb(if striped { dark } else { colour }));
            bbox = [
                bbox[0].min(x),
                bbox[1].min(y),
                bbox[2].max(x + 1),
                bbox[3].max(y + 1),
            ];
            area += 1;
        }
    }
    Object {
        bbox,
        area,
        ..p.obj
    }
}

/// A (possibly partial) attribute description; `None` fields are unconstrained.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Desc {
    shape: Option<Shape>,
    colour: Option<Colour>,
    size: Option<Size>,
    texture: Option<Texture>,
}

impl Desc {
    /// The description of `o` restricted to the attributes selected by `mask` bits
    /// (1 shape, 2 colour, 4 size, 8 texture).
    fn of(o: &Object, mask: u8) -> Self {
        Desc {
            shape: (mask & 1 != 0).then_some(o.shape),
            colour: (mask & 2 != 0).then_some(o.colour),
            size: (mask & 4 != 0).then_some(o.size),
            texture: (mask & 8 != 0).then_some(o.texture),
        }
    }
    fn matches(&self, o: &Object) -> bool {
        self.shape.is_none_or(|v| v == o.shape)
            && self.colour.is_none_or(|v| v == o.colour)
            && self.size.is_none_or(|v| v == o.size)
            && self.texture.is_none_or(|v| v == o.texture)
    }
    fn matching(&self, scene: &Scene) -> Vec<usize> {
        (0..scene.objects.len())
            .filter(|&i| self.matches(&scene.objects[i]))
            .collect()
    }
}

/// Direction for extremes, ordinals (counted *from* that side) and relations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Left,
    Right,
    Up,
    Down,
}

/// Per [`Dir`]: side word, position templates (`{}` = noun phrase), relation words.
/// Left and right entries mirror each other word for word (flip consistency).
const DIR_WORDS: [(&str, &[&str], &[&str]); 4] = [
    (
        "left",
        &[
            "the leftmost {}",
            "the {} on the far left",
            "the {} furthest to the left",
        ],
        &["left of", "to the left of", "on the left of"],
    ),
    (
        "right",
        &[
            "the rightmost {}",
            "the {} on the far right",
            "the {} furthest to the right",
        ],
        &["right of", "to the right of", "on the right of"],
    ),
    (
        "top",
        &["the topmost {}", "the highest {}", "the {} at the top"],
        &["above", "higher than"],
    ),
    (
        "bottom",
        &["the bottommost {}", "the lowest {}", "the {} at the bottom"],
        &["below", "under", "beneath"],
    ),
];

impl Dir {
    const ALL: [Dir; 4] = [Dir::Left, Dir::Right, Dir::Up, Dir::Down];

    /// How far `p` lies towards this side (larger = further).
    fn key(self, p: (f32, f32)) -> f32 {
        [-p.0, p.0, -p.1, p.1][self as usize]
    }
    /// Distance across this direction (for the dominance test of relations).
    fn across(self, a: (f32, f32), b: (f32, f32)) -> f32 {
        if matches!(self, Dir::Left | Dir::Right) {
            (a.1 - b.1).abs()
        } else {
            (a.0 - b.0).abs()
        }
    }
    fn words(
        self,
    ) -> (
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    ) {
        DIR_WORDS[self as usize]
    }
}

/// Expression type, stored as `extra["type"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Attribute,
    Position,
    Relation,
    Ordinal,
    Comparative,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Attribute,
        Kind::Position,
        Kind::Relation,
        Kind::Ordinal,
        Kind::Comparative,
    ];
    fn name(self) -> &'static str {
        [
            "attribute",
            "position",
            "relation",
            "ordinal",
            "comparative",
        ][self as usize]
    }
}

/// The meaning of a referring expression.
#[derive(Debug, Clone, PartialEq)]
enum Query {
    /// "the small blue triangle"
    Attribute(Desc),
    /// "the leftmost square"
    Position { desc: Desc, dir: Dir },
    /// "the circle left of the green star"
    Relation {
        desc: Desc,
        dir: Dir,
        reference: Desc,
    },
    /// "the second circle from the left" (`rank` is 1-based)
    Ordinal { desc: Desc, dir: Dir, rank: usize },
    /// "the largest red shape"
    Comparative { desc: Desc, largest: bool },
}

impl Query {
    fn kind(&self) -> Kind {
        match self {
            Query::Attribute(_) => Kind::Attribute,
            Query::Position { .. } => Kind::Position,
            Query::Relation { .. } => Kind::Relation,
            Query::Ordinal { .. } => Kind::Ordinal,
            Query::Comparative { .. } => Kind::Comparative,
        }
    }

    /// Every object a reader could take the expression to mean. Near-ties (within the
    /// spatial margin or area ratio) count as candidates, and an unclear or ambiguous
    /// reading (ambiguous reference, non-dominant direction) denotes nothing, so a query is
    /// unambiguous exactly when this returns one index.
    fn evaluate(&self, scene: &Scene) -> Vec<usize> {
        match *self {
            Query::Attribute(desc) => desc.matching(scene),
            Query::Position { desc, dir } => ranked(scene, desc, dir, 1),
            Query::Ordinal { desc, dir, rank } => ranked(scene, desc, dir, rank),
            Query::Relation {
                desc,
                dir,
                reference,
            } => related(scene, desc, dir, reference),
            Query::Comparative { desc, largest } => {
                let cands = desc.matching(scene);
                let areas = cands.iter().map(|&i| scene.objects[i].area as f32);
                let (best, keep): (f32, fn(f32, f32) -> bool) = if largest {
                    (areas.fold(0.0, f32::max), |a, m| a * AREA_RATIO > m)
                } else {
                    (areas.fold(f32::MAX, f32::min), |a, m| a < m * AREA_RATIO)
                };
                cands
                    .into_iter()
                    .filter(|&i| keep(scene.objects[i].area as f32, best))
                    .collect()
            }
        }
    }
}

/// Objects that could be the `rank`-th `desc` counted from `dir`: the true one plus any
/// within the margin of it.
fn ranked(scene: &Scene, desc: Desc, dir: Dir, rank: usize) -> Vec<usize> {
    let mut cands: Vec<(f32, usize)> = desc
        .matching(scene)
        .into_iter()
        .map(|i| (dir.key(scene.objects[i].centre()), i))
        .collect();
    if rank == 0 || rank > cands.len() {
        return Vec::new();
    }
    cands.sort_by(|a, b| b.0.total_cmp(&a.0));
    let k = cands[rank - 1].0;
    cands
        .into_iter()
        .filter(|c| (c.0 - k).abs() < scene.margin())
        .map(|c| c.1)
        .collect()
}

/// Objects matching `desc` anywhere towards `dir` of the unique `reference` object; a
/// single candidate that is not clearly (by the margin, and dominantly) there is unclear.
fn related(scene: &Scene, desc: Desc, dir: Dir, reference: Desc) -> Vec<usize> {
    let [r] = reference.matching(scene)[..] else {
        return Vec::new();
    };
    let rc = scene.objects[r].centre();
    let ahead = |i: usize| dir.key(scene.objects[i].centre()) - dir.key(rc);
    let cands: Vec<usize> = desc
        .matching(scene)
        .into_iter()
        .filter(|&i| i != r && ahead(i) > 0.0)
        .collect();
    if let [t] = cands[..] {
        let d = ahead(t);
        if d < scene.margin() || d < dir.across(scene.objects[t].centre(), rc) {
            return Vec::new();
        }
    }
    cands
}

/// A shortest unique attribute description of object `idx` (ties broken at random).
fn minimal_desc(scene: &Scene, idx: usize, rng: &mut ChaCha8Rng) -> Option<Desc> {
    let mut masks: Vec<u8> = (1..16).collect();
    masks.shuffle(rng);
    masks.sort_by_key(|m| m.count_ones());
    let o = &scene.objects[idx];
    masks
        .into_iter()
        .map(|m| Desc::of(o, m))
        .find(|d| d.matching(scene) == [idx])
}

/// All unambiguous queries for `target`; `ref_ok` filters relation reference objects.
fn candidates(
    scene: &Scene,
    target: usize,
    rng: &mut ChaCha8Rng,
    ref_ok: &dyn Fn(&Object) -> bool,
) -> Vec<Query> {
    let mut out: Vec<Query> = minimal_desc(scene, target, rng)
        .map(Query::Attribute)
        .into_iter()
        .collect();
    let refs: Vec<Desc> = (0..scene.objects.len())
        .filter(|&r| r != target && ref_ok(&scene.objects[r]))
        .filter_map(|r| minimal_desc(scene, r, rng))
        .collect();
    for mask in [0, 1, 2, 3] {
        let desc = Desc::of(&scene.objects[target], mask);
        if desc.matching(scene).len() < 2 {
            continue; // the spatial/size part must be needed
        }
        for dir in Dir::ALL {
            out.push(Query::Position { desc, dir });
            out.extend((1..=RANKS.len()).map(|rank| Query::Ordinal { desc, dir, rank }));
            out.extend(refs.iter().map(|&reference| Query::Relation {
                desc,
                dir,
                reference,
            }));
        }
        out.extend([true, false].map(|largest| Query::Comparative { desc, largest }));
    }
    out.retain(|q| q.evaluate(scene) == [target]);
    out
}

fn pick<'a>(words: &[&'a str], rng: &mut ChaCha8Rng) -> &'a str {
    words.choose(rng).copied().unwrap_or_default()
}

/// "small red striped circle" (no determiner); generic noun when the shape is open.
fn noun_phrase(d: &Desc, rng: &mut ChaCha8Rng) -> String {
    let mut words = Vec::new();
    if let Some(v) = d.size {
        words.push(pick(v.words(), rng));
    }
    if let Some(v) = d.colour {
        words.push(pick(v.words(), rng));
    }
    if let Some(v) = d.texture {
        words.push(pick(v.words(), rng));
    }
    words.push(match d.shape {
        Some(v) => pick(v.words(), rng),
        None => pick(GENERIC, rng),
    });
    words.join(" ")
}

/// Surface text and the noun phrases it contains (each a substring of the text).
fn render(q: &Query, rng: &mut ChaCha8Rng) -> (String, Vec<String>) {
    let text = match q {
        Query::Attribute(d) => format!("the {}", noun_phrase(d, rng)),
        Query::Position { desc, dir } => {
            pick(dir.words().1, rng).replace("{}", &noun_phrase(desc, rng))
        }
        Query::Ordinal { desc, dir, rank } => {
            let np = noun_phrase(desc, rng);
            let counting = if rng.random_bool(0.3) {
                "counting "
            } else {
                ""
            };
            format!(
                "the {} {np} {counting}from the {}",
                RANKS[rank - 1],
                dir.words().0
            )
        }
        Query::Comparative { desc, largest } => {
            let adj = pick(
                if *largest {
                    &["largest", "biggest"]
                } else {
                    &["smallest", "tiniest"]
                },
                rng,
            );
            format!("the {adj} {}", noun_phrase(desc, rng))
        }
        Query::Relation {
            desc,
            dir,
            reference,
        } => {
            let target = format!("the {}", noun_phrase(desc, rng));
            let reference = format!("the {}", noun_phrase(reference, rng));
            let link = pick(&["", "that is ", "which is "], rng);
            let text = format!("{target} {link}{} {reference}", pick(dir.words().2, rng));
            return (text, vec![target, reference]);
        }
    };
    (text.clone(), vec![text])
}

/// "a small red circle, a large striped blue square and a big star"; colours of
/// `hidden` combos are left out so held-out pairs never occur in training text.
fn caption(objects: &[Object], hidden: &dyn Fn(&Object) -> bool, rng: &mut ChaCha8Rng) -> String {
    let mut order: Vec<&Object> = objects.iter().collect();
    order.shuffle(rng);
    let parts: Vec<String> = order
        .into_iter()
        .map(|o| {
            let desc = Desc {
                colour: (!hidden(o)).then_some(o.colour),
                texture: (o.texture == Texture::Striped).then_some(o.texture),
                ..Desc::of(o, 5)
            };
            format!("a {}", noun_phrase(&desc, rng))
        })
        .collect();
    match parts.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => parts.join(""),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Val,
    TestA,
    TestB,
    Heldout,
}

impl Split {
    const ALL: [Split; 5] = [
        Split::Train,
        Split::Val,
        Split::TestA,
        Split::TestB,
        Split::Heldout,
    ];
    fn name(self) -> &'static str {
        ["train", "val", "testA", "testB", "heldout"][self as usize]
    }
    fn count(self, cfg: &SynthConfig) -> usize {
        [cfg.train, cfg.val, cfg.test_a, cfg.test_b, cfg.heldout][self as usize]
    }
    /// Sampling weight per [`Kind`] (same order as `Kind::ALL`).
    fn weights(self) -> [f64; 5] {
        match self {
            Split::TestA => [0.5, 0.5, 0.0, 0.0, 0.0],
            Split::TestB => [0.0, 0.0, 0.4, 0.3, 0.3],
            _ => [0.2, 0.2, 0.25, 0.175, 0.175],
        }
    }
}

/// Deterministic choice of held-out (colour, shape) combos with distinct colours and shapes.
fn heldout_combos(seed: u64) -> Vec<Combo> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut all: Vec<Combo> = Colour::ALL
        .iter()
        .flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)))
        .collect();
    all.shuffle(&mut rng);
    let mut chosen: Vec<Combo> = Vec::new();
    for c in all {
        if chosen.len() < HELDOUT_COMBOS && chosen.iter().all(|h| h.0 != c.0 && h.1 != c.1) {
            chosen.push(c);
        }
    }
    chosen.sort();
    chosen
}

/// One expression of a scene.
#[derive(Debug, Clone)]
struct Sample {
    target: usize,
    query: Query,
    expr: String,
    phrases: Vec<String>,
}

/// One image with its objects, caption and expressions.
struct Generated {
    scene: Scene,
    image: RgbImage,
    caption: String,
    samples: Vec<Sample>,
}

/// Builds scene number `attempt` of `split` from its own random stream.
fn generate_scene(
    cfg: &SynthConfig,
    heldout: &[Combo],
    split: Split,
    attempt: u64,
) -> Result<Generated, SynthError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(((split as u64 + 1) << 40) | attempt);
    let is_heldout = |o: &Object| heldout.contains(&o.combo());
    let forced = if split == Split::Heldout {
        heldout.choose(&mut rng).copied()
    } else {
        None
    };
    let mut image = background(&mut rng, cfg.image_size);
    let placements = place_objects(&mut rng, cfg, forced)?;
    let objects: Vec<Object> = placements
        .into_iter()
        .map(|p| paint(&mut image, p))
        .collect();
    let scene = Scene {
        size: cfg.image_size,
        objects,
    };

    let target_ok = |o: &Object| is_heldout(o) == (split == Split::Heldout);
    let ref_ok = |o: &Object| split == Split::Heldout || !is_heldout(o);
    let mut pool: Vec<(usize, Query)> = Vec::new();
    for t in (0..scene.objects.len()).filter(|&t| target_ok(&scene.objects[t])) {
        pool.extend(
            candidates(&scene, t, &mut rng, &ref_ok)
                .into_iter()
                .map(|q| (t, q)),
        );
    }
    let weights = split.weights();
    let mut samples = Vec::new();
    while samples.len() < PER_SCENE {
        let avail: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|&k| weights[k as usize] > 0.0 && pool.iter().any(|c| c.1.kind() == k))
            .collect();
        let Ok(&kind) = avail.choose_weighted(&mut rng, |&k| weights[k as usize]) else {
            break;
        };
        let of_kind: Vec<&(usize, Query)> = pool.iter().filter(|c| c.1.kind() == kind).collect();
        let Some(&&(target, ref query)) = of_kind.choose(&mut rng) else {
            break;
        };
        let (expr, phrases) = render(query, &mut rng);
        samples.push(Sample {
            target,
            query: query.clone(),
            expr,
            phrases,
        });
        pool.retain(|c| c.0 != target);
    }
    let hidden = |o: &Object| split != Split::Heldout && is_heldout(o);
    let caption = caption(&scene.objects, &hidden, &mut rng);
    Ok(Generated {
        scene,
        image,
        caption,
        samples,
    })
}

/// Generates scenes of `split` until it holds its configured number of expressions,
/// handing each non-empty scene (last one truncated) to `sink`.
fn generate_split(
    cfg: &SynthConfig,
    heldout: &[Combo],
    split: Split,
    sink: &mut dyn FnMut(Generated) -> Result<(), SynthError>,
) -> Result<(), SynthError> {
    let (mut remaining, mut empty) = (split.count(cfg), 0);
    for attempt in 0.. {
        if remaining == 0 {
            break;
        }
        let mut g = generate_scene(cfg, heldout, split, attempt)?;
        if g.samples.is_empty() {
            empty += 1;
            if empty > MAX_EMPTY_SCENES {
                return Err(SynthError::Config(format!(
                    "split {} yields no expressions",
                    split.name()
                )));
            }
            continue;
        }
        empty = 0;
        g.samples.truncate(remaining);
        remaining -= g.samples.len();
        sink(g)?;
    }
    Ok(())
}

/// Buffered JSON-lines output that names its path in errors.
struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlWriter {
    fn create(path: PathBuf) -> Result<Self, SynthError> {
        let file = File::create(&path).map_err(|source| SynthError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            out: BufWriter::new(file),
        })
    }
    fn line<T: Serialize>(&mut self, value: &T) -> Result<(), SynthError> {
        serde_json::to_writer(&mut self.out, value).map_err(|source| SynthError::Json {
            path: self.path.clone(),
            source,
        })?;
        self.out.write_all(b"\n").map_err(|source| SynthError::Io {
            path: self.path.clone(),
            source,
        })
    }
    fn finish(mut self) -> Result<(), SynthError> {
        self.out.flush().map_err(|source| SynthError::Io {
            path: self.path,
            source,
        })
    }
}

fn create_dir(path: &Path) -> Result<(), SynthError> {
    fs::create_dir_all(path).map_err(|source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn record(split: Split, n: usize, image: &str, g: &Generated, s: &Sample) -> Record {
    let mut extra = Map::new();
    extra.insert("type".into(), json!(s.query.kind().name()));
    extra.insert("phrases".into(), json!(s.phrases));
    // the box of each phrase: the target, then a relation's reference object
    let mut phrase_boxes = vec![g.scene.objects[s.target].bbox];
    if let Query::Relation { reference, .. } = &s.query {
        if let [r] = reference.matching(&g.scene)[..] {
            phrase_boxes.push(g.scene.objects[r].bbox);
        }
    }
    extra.insert("phrase_boxes".into(), json!(phrase_boxes));
    extra.insert("target".into(), json!(s.target));
    Record {
        id: format!("synth/{}/{n:06}", split.name()),
        dataset: "synth".into(),
        split_by: None,
        split: split.name().into(),
        image: image.into(),
        width: Some(g.scene.size),
        height: Some(g.scene.size),
        bbox_xyxy: g.scene.objects[s.target].bbox.map(|v| v as f32),
        bbox_src: "xyxy".into(),
        expr: s.expr.clone(),
        extra,
    }
}

fn objects_json(split: Split, image: &str, scene: &Scene) -> Value {
    let objects: Vec<Value> = scene
        .objects
        .iter()
        .map(|o| json!({"shape": o.shape.name(), "colour": o.colour.name(), "size": o.size.name(), "texture": o.texture.name(), "bbox_xyxy": o.bbox}))
        .collect();
    json!({"image": image, "split": split.name(), "objects": objects})
}

/// Writes the benchmark for `cfg` into `out_dir` (see the module docs for the layout).
/// `progress(done, total)` is called after every image with expression counts.
pub fn generate(
    cfg: &SynthConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SynthSummary, SynthError> {
    cfg.validate()?;
    let heldout = heldout_combos(cfg.seed);
    create_dir(out_dir)?;
    let mut objects_out = JsonlWriter::create(out_dir.join("objects.jsonl"))?;
    let mut captions_out = JsonlWriter::create(out_dir.join("captions.jsonl"))?;
    let total: usize = Split::ALL.iter().map(|s| s.count(cfg)).sum();
    let (mut done, mut images) = (0, 0);
    let mut summary = SynthSummary {
        splits: Vec::new(),
        images: 0,
        by_type: BTreeMap::new(),
    };
    let (mut split_images, mut split_types) = (BTreeMap::new(), BTreeMap::new());
    for split in Split::ALL {
        create_dir(&out_dir.join("images").join(split.name()))?;
        let mut records = JsonlWriter::create(out_dir.join(format!("{}.jsonl", split.name())))?;
        let (mut n_images, mut n_records) = (0, 0);
        let types: &mut BTreeMap<&str, usize> = split_types.entry(split.name()).or_default();
        generate_split(cfg, &heldout, split, &mut |g| {
            let rel = format!("images/{}/{n_images:06}.png", split.name());
            let path = out_dir.join(&rel);
            g.image
                .save_with_format(&path, ImageFormat::Png)
                .map_err(|source| SynthError::Image { path, source })?;
            objects_out.line(&objects_json(split, &rel, &g.scene))?;
            captions_out
                .line(&json!({"image": rel, "split": split.name(), "caption": g.caption}))?;
            for s in &g.samples {
                records.line(&record(split, n_records, &rel, &g, s))?;
                *types.entry(s.query.kind().name()).or_default() += 1;
                *summary
                    .by_type
                    .entry(s.query.kind().name().to_string())
                    .or_default() += 1;
                n_records += 1;
            }
            n_images += 1;
            done += g.samples.len();
            progress(done, total);
            Ok(())
        })?;
        records.finish()?;
        images += n_images;
        split_images.insert(split.name(), n_images);
        summary.splits.push((split.name().to_string(), n_records));
    }
    objects_out.finish()?;
    captions_out.finish()?;
    summary.images = images;
    let meta = json!({
        "generator": GENERATOR_VERSION,
        "config": cfg,
        "records": summary.splits.iter().cloned().collect::<BTreeMap<_, _>>(),
        "images": split_images,
        "by_type": split_types,
        "heldout_combos": heldout.iter().map(|c| json!({"colour": c.0.name(), "shape": c.1.name()})).collect::<Vec<_>>(),
    });
    let meta_path = out_dir.join("meta.json");
    let text = serde_json::to_string_pretty(&meta).map_err(|source| SynthError::Json {
        path: meta_path.clone(),
        source,
    })?;
    fs::write(&meta_path, text + "\n").map_err(|source| SynthError::Io {
        path: meta_path,
        source,
    })?;
    let labels = crate::phrases::Labels {
        field: "shape".into(),
        classes: Shape::ALL
            .iter()
            .map(|s| crate::phrases::Label {
                name: s.name().into(),
                words: s.words()[1..].iter().map(|w| w.to_string()).collect(),
            })
            .collect(),
    };
    let labels_path = out_dir.join("labels.json");
    let text = serde_json::to_string_pretty(&labels).map_err(|source| SynthError::Json {
        path: labels_path.clone(),
        source,
    })?;
    fs::write(&labels_path, text + "\n").map_err(|source| SynthError::Io {
        path: labels_path,
        source,
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All scenes of all splits, in memory.
    fn scenes(cfg: &SynthConfig) -> Vec<(Split, Generated)> {
        let heldout = heldout_combos(cfg.seed);
        let mut out = Vec::new();
        for split in Split::ALL {
            generate_split(cfg, &heldout, split, &mut |g| {
                out.push((split, g));
                Ok(())
            })
            .unwrap();
        }
        out
    }

    fn obj(shape: Shape, colour: Colour, x: u32, y: u32, r: u32) -> Object {
        let bbox = [x - r, y - r, x + r, y + r];
        Object {
            shape,
            colour,
            size: Size::Large,
            texture: Texture::Plain,
            bbox,
            area: 4 * r * r,
        }
    }

    #[test]
    fn synth_queries_resolve_uniquely_and_respect_split_policy() {
        let cfg = SynthConfig {
            train: 300,
            val: 60,
            test_a: 60,
            test_b: 60,
            heldout: 60,
            ..SynthConfig::tiny()
        };
        let heldout = heldout_combos(cfg.seed);
        let all = scenes(&cfg);
        for split in Split::ALL {
            let n: usize = all
                .iter()
                .filter(|(s, _)| *s == split)
                .map(|(_, g)| g.samples.len())
                .sum();
            assert_eq!(n, split.count(&cfg), "{}", split.name());
        }
        for (split, g) in &all {
            for s in &g.samples {
                assert_eq!(
                    s.query.evaluate(&g.scene),
                    vec![s.target],
                    "{} {:?}",
                    s.expr,
                    s.query
                );
                assert!(
                    split.weights()[s.query.kind() as usize] > 0.0,
                    "{} in {}",
                    s.expr,
                    split.name()
                );
                let target = &g.scene.objects[s.target];
                assert_eq!(
                    heldout.contains(&target.combo()),
                    *split == Split::Heldout,
                    "{}",
                    s.expr
                );
                assert!(
                    target.bbox[2] <= cfg.image_size
                        && target.bbox[3] <= cfg.image_size
                        && target.area > 0
                );
                assert!(
                    s.phrases.iter().all(|p| s.expr.contains(p.as_str())),
                    "{} {:?}",
                    s.expr,
                    s.phrases
                );
                if let Query::Relation { reference, .. } = s.query {
                    let r = reference.matching(&g.scene)[0]; // unique, as evaluate succeeded
                    assert!(
                        *split == Split::Heldout || !heldout.contains(&g.scene.objects[r].combo()),
                        "{}",
                        s.expr
                    );
                }
            }
        }
        let again = scenes(&cfg);
        let texts = |v: &[(Split, Generated)]| {
            v.iter()
                .flat_map(|(_, g)| g.samples.iter().map(|s| s.expr.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(&all), texts(&again));
    }

    #[test]
    fn synth_train_and_val_are_mostly_reasoning_types() {
        let cfg = SynthConfig {
            train: 600,
            val: 200,
            test_a: 0,
            test_b: 0,
            heldout: 0,
            ..SynthConfig::small()
        };
        for split in [Split::Train, Split::Val] {
            let kinds: Vec<Kind> = scenes(&cfg)
                .into_iter()
                .filter(|(s, _)| *s == split)
                .flat_map(|(_, g)| g.samples.into_iter().map(|s| s.query.kind()))
                .collect();
            let hard = kinds.iter().filter(|k| **k >= Kind::Relation).count();
            assert!(
                hard as f64 >= 0.4 * kinds.len() as f64,
                "{hard} of {}",
                kinds.len()
            );
            assert!(Kind::ALL.iter().all(|k| kinds.contains(k)));
        }
    }

    #[test]
    fn synth_semantics_reject_near_ties_and_ambiguous_references() {
        let scene = |objects| Scene { size: 100, objects };
        let base = vec![
            obj(Shape::Circle, Colour::Red, 20, 50, 5),
            obj(Shape::Star, Colour::Green, 60, 50, 5),
            obj(Shape::Circle, Colour::Blue, 80, 20, 5),
        ];
        let s = scene(base.clone());
        let star = Desc {
            shape: Some(Shape::Star),
            ..Desc::default()
        };
        let circle = Desc {
            shape: Some(Shape::Circle),
            ..Desc::default()
        };
        assert_eq!(
            Query::Relation {
                desc: circle,
                dir: Dir::Left,
                reference: star
            }
            .evaluate(&s),
            vec![0]
        );
        assert_eq!(
            Query::Position {
                desc: circle,
                dir: Dir::Left
            }
            .evaluate(&s),
            vec![0]
        );
        assert_eq!(
            Query::Ordinal {
                desc: Desc::default(),
                dir: Dir::Left,
                rank: 2
            }
            .evaluate(&s),
            vec![1]
        );
        // A second circle barely left of the star makes "left of" ambiguous.
        let mut crowded = base.clone();
        crowded.push(obj(Shape::Circle, Colour::Green, 57, 85, 5));
        assert_eq!(
            Query::Relation {
                desc: circle,
                dir: Dir::Left,
                reference: star
            }
            .evaluate(&scene(crowded))
            .len(),
            2
        );
        // A lone candidate that is mostly below, not left, is unclear.
        let mut below = base.clone();
        below[0] = obj(Shape::Circle, Colour::Red, 50, 90, 5);
        assert!(Query::Relation {
            desc: circle,
            dir: Dir::Left,
            reference: star
        }
        .evaluate(&scene(below))
        .is_empty());
        // Two stars: the reference is ambiguous.
        let mut two_stars = base.clone();
        two_stars.push(obj(Shape::Star, Colour::Red, 60, 85, 5));
        assert!(Query::Relation {
            desc: circle,
            dir: Dir::Left,
            reference: star
        }
        .evaluate(&scene(two_stars))
        .is_empty());
        // Extremes within the margin and areas within the ratio tie.
        let mut tie = base;
        tie[0] = obj(Shape::Circle, Colour::Red, 75, 50, 6);
        assert_eq!(
            Query::Position {
                desc: circle,
                dir: Dir::Right
            }
            .evaluate(&scene(tie.clone()))
            .len(),
            2
        );
        assert_eq!(
            Query::Comparative {
                desc: circle,
                largest: true
            }
            .evaluate(&scene(tie.clone()))
            .len(),
            2
        );
        // Captions leave out the colour of hidden (held-out) combos.
        let text = caption(&tie, &|_| true, &mut ChaCha8Rng::seed_from_u64(0));
        assert!(
            Colour::ALL
                .iter()
                .flat_map(|c| c.words())
                .all(|w| !text.contains(w)),
            "{text}"
        );
    }

    fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.push((
                        path.strip_prefix(dir).unwrap().to_path_buf(),
                        fs::read(&path).unwrap(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn synth_generate_is_byte_identical_and_readable() {
        let cfg = SynthConfig::tiny();
        let dirs: Vec<PathBuf> = (0..2)
            .map(|i| std::env::temp_dir().join(format!("gk-synth-test-{}-{i}", std::process::id())))
            .collect();
        let mut calls = 0;
        let summary = generate(&cfg, &dirs[0], &mut |_, _| calls += 1).unwrap();
        generate(&cfg, &dirs[1], &mut |_, _| {}).unwrap();
        assert_eq!(calls, summary.images);
        let (a, b) = (files(&dirs[0]), files(&dirs[1]));
        assert_eq!(a, b);
        for (split, n) in &summary.splits {
            let text = fs::read_to_string(dirs[0].join(format!("{split}.jsonl"))).unwrap();
            let records: Vec<Record> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(records.len(), *n);
            for r in &records {
                let img = image::open(dirs[0].join(&r.image)).unwrap();
                assert_eq!(
                    (img.width(), img.height()),
                    (cfg.image_size, cfg.image_size)
                );
                assert!(r.bbox_xyxy[0] < r.bbox_xyxy[2] && r.bbox_xyxy[3] <= cfg.image_size as f32);
            }
        }
        assert!(dirs[0].join("meta.json").is_file());
        for d in &dirs {
            fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn synth_rejects_bad_config() {
        let bad = SynthConfig {
            min_objects: 5,
            max_objects: 4,
            ..SynthConfig::tiny()
        };
        assert!(matches!(
            generate(&bad, Path::new("/nonexistent"), &mut |_, _| {}),
            Err(SynthError::Config(_))
        ));
    }
}
