//! `groundkit convert` (published split files to canonical JSONL, once) and
//! `groundkit stats` (what a JSONL file holds, to check a conversion against the
//! published split sizes).

use anyhow::{bail, Context, Result};
use gk_data::dataset::{check_record, resolve_image, Dataset, LoadOptions, Skipped};
use gk_data::published::{self, Converted, DatasetKey, SourceFile};
use gk_data::record::Record;
use gk_data::refer::{self, ReferSource};
use gk_data::{pth, sha256};
use gk_train::weights::write_atomic;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceFormat {
    /// TransVG / HiVG / CLIP-VG `.pth` split lists (zip or legacy torch containers).
    Transvg,
    /// The `refer` API layout: `refs(<split_by>).p` + `instances.json`.
    Refer,
    /// Flickr30k Entities' own layout: `<split>.txt`, `Sentences/`, `Annotations/` (one
    /// record per caption, its phrases with their boxes; `--dataset flickr`).
    Entities,
    /// ReferItGame's JSON layout (text_objseg's `exp-referit/data`, which ReSC and TransVG
    /// built their lists from): `referit_query_<split>.json` + `referit_bbox.json`
    /// (+ `referit_imsize.json`); `--dataset referit`.
    TextObjseg,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source format.
    #[arg(long, value_enum)]
    pub from: SourceFormat,
    /// Dataset key: unc, unc+, gref, gref_umd, referit, flickr, mixup.
    #[arg(long)]
    pub dataset: String,
    /// Split: train, val, testA, testB, test or trainval (train + val, as TransVG builds it;
    /// ReferIt ships its own). With --from refer, `all` keeps every split.
    #[arg(long)]
    pub split: String,
    /// transvg: the split root (holding <dataset>/<dataset>_<split>.pth) or one .pth file.
    /// refer: the data/<dataset> folder (refs(<split_by>).p and instances.json).
    /// entities: the flickr30k_entities folder. text-objseg: the folder of the referit_*.json.
    #[arg(long)]
    pub input: PathBuf,
    /// The JSONL to write; `<out>.meta.json` records the sources, their sha256 and the row count.
    #[arg(long)]
    pub out: PathBuf,
    /// refer: split_by (default: unc for unc/unc+, google for gref, umd for gref_umd).
    #[arg(long)]
    pub split_by: Option<String>,
    /// Image root, for --check-images (TransVG's ln_data and HiVG's layouts are recognised).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Check that every row's image exists under --images.
    #[arg(long, requires = "images")]
    pub check_images: bool,
    /// Skip and count bad rows (and rows whose image is missing) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
}

fn key(s: &str) -> Result<DatasetKey> {
    DatasetKey::parse(s).with_context(|| {
        let all: Vec<&str> = DatasetKey::ALL.iter().map(|k| k.key()).collect();
        format!("unknown dataset key `{s}` (one of: {})", all.join(", "))
    })
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let key = key(&a.dataset)?;
    let mut conv = Converted::default();
    match a.from {
        SourceFormat::Transvg => {
            if a.split != "trainval" && !key.splits().contains(&a.split.as_str()) {
                bail!(
                    "{} has no split `{}` (splits: {})",
                    key.key(),
                    a.split,
                    key.splits().join(", ")
                );
            }
            let files: Vec<PathBuf> = if a.input.is_file() {
                vec![a.input.clone()]
            } else {
                key.split_files(&a.split)
                    .iter()
                    .map(|f| a.input.join(f))
                    .collect()
            };
            for f in &files {
                let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let (v, container) = pth::decode(&bytes, f)?;
                let part = published::convert_split_list(
                    &v,
                    key,
                    &a.split,
                    f,
                    a.skip_bad,
                    conv.records.len() + conv.skipped.len(),
                )?;
                eprintln!(
                    "{}: {:?} container, {} rows, {} skipped",
                    f.display(),
                    container,
                    part.records.len(),
                    part.skipped.len()
                );
                conv.records.extend(part.records);
                conv.skipped.extend(part.skipped);
                conv.sources.push(SourceFile::of(f, &bytes));
            }
        }
        SourceFormat::Refer => {
            let split_by = match (&a.split_by, key.split_by()) {
                (Some(s), _) => s.clone(),
                (None, Some(s)) if key != DatasetKey::Referit => s.to_string(),
                _ => bail!(
                    "--from refer --dataset {} needs --split-by (refclef has unc and berkeley)",
                    key.key()
                ),
            };
            let src = ReferSource::in_dir(&a.input, &split_by);
            let split = (a.split != "all").then_some(a.split.as_str());
            conv = refer::read(&src, split, a.skip_bad)?;
        }
        SourceFormat::Entities => {
            if key != DatasetKey::Flickr {
                bail!("--from entities reads Flickr30k Entities: use --dataset flickr");
            }
            if !["train", "val", "test"].contains(&a.split.as_str()) {
                bail!("Flickr30k Entities has splits train, val, test");
            }
            conv = gk_data::entities::read(&a.input, &a.split, a.skip_bad)?;
        }
        SourceFormat::TextObjseg => {
            if key != DatasetKey::Referit {
                bail!("--from text-objseg reads ReferItGame: use --dataset referit");
            }
            conv = gk_data::referit::read(&a.input, &a.split, a.skip_bad)?;
        }
    }
    validate(&mut conv, a.skip_bad)?;
    if let (true, Some(root)) = (a.check_images, &a.images) {
        check_images(&mut conv, root, a.skip_bad)?;
    }
    if conv.records.is_empty() {
        bail!("no rows to write (split `{}`)", a.split);
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = String::new();
    for r in &conv.records {
        text += &serde_json::to_string(r)?;
        text.push('\n');
    }
    write_atomic(&a.out, text.as_bytes())?;
    let meta = serde_json::json!({
        "from": format!("{:?}", a.from).to_lowercase(),
        "dataset": key.key(),
        "split": a.split,
        "sources": conv.sources.iter().map(|f| serde_json::json!({"path": f.path, "sha256": f.sha256, "bytes": f.bytes})).collect::<Vec<_>>(),
        "rows": conv.records.len(),
        "skipped": conv.skipped.len(),
        "skipped_rows": conv.skipped.iter().take(50).map(|s| serde_json::json!({"row": (s.line != NO_ROW).then_some(s.line), "reason": s.reason})).collect::<Vec<_>>(),
        "output_sha256": sha256::hex(text.as_bytes()),
        "groundkit": env!("CARGO_PKG_VERSION"),
    });
    let meta_path = PathBuf::from(format!("{}.meta.json", a.out.with_extension("").display()));
    write_atomic(&meta_path, serde_json::to_string_pretty(&meta)?.as_bytes())?;
    eprintln!(
        "wrote {} rows to {} ({} skipped){}",
        conv.records.len(),
        a.out.display(),
        conv.skipped.len(),
        if conv.skipped.is_empty() {
            ""
        } else {
            "; see skipped_rows in the .meta.json"
        }
    );
    Ok(())
}

/// `Skipped::line` of a row dropped after conversion (a record, not a source row):
/// written as `null` in the `.meta.json`.
const NO_ROW: usize = usize::MAX;

/// The canonical loader's checks (box inside a known image size, ...) on every row.
fn validate(conv: &mut Converted, skip_bad: bool) -> Result<()> {
    let mut kept = Vec::with_capacity(conv.records.len());
    for r in std::mem::take(&mut conv.records) {
        match check_record(&r, Path::new(""), false) {
            Ok(_) => kept.push(r),
            Err(msg) if skip_bad => conv.skipped.push(Skipped {
                line: NO_ROW,
                reason: format!("record {}: {msg}", r.id),
            }),
            Err(msg) => bail!("record {}: {msg}", r.id),
        }
    }
    conv.records = kept;
    Ok(())
}

fn check_images(conv: &mut Converted, root: &Path, skip_bad: bool) -> Result<()> {
    let mut missing: Vec<String> = Vec::new();
    let mut seen = BTreeMap::new();
    conv.records.retain(|r| {
        let ok = *seen
            .entry(r.image.clone())
            .or_insert_with(|| resolve_image(root, &r.image).is_file());
        if !ok {
            missing.push(r.image.clone());
        }
        ok
    });
    if missing.is_empty() {
        return Ok(());
    }
    let distinct: BTreeSet<&String> = missing.iter().collect();
    if !skip_bad {
        let first: Vec<&str> = distinct.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "{} rows name {} images missing under {} (first: {}); --skip-bad drops them",
            missing.len(),
            distinct.len(),
            root.display(),
            first.join(", ")
        );
    }
    conv.skipped.extend(missing.iter().map(|m| Skipped {
        line: NO_ROW,
        reason: format!("image {m} is missing"),
    }));
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// A canonical JSONL file.
    pub file: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Expression counts the literature gives (unverified, `shared/data.md` §1.1): a sanity
/// check for conversions, printed beside the counted numbers.
fn published_size(dataset: &str, split_by: Option<&str>, split: &str) -> Option<usize> {
    Some(match (dataset, split_by, split) {
        ("refcoco", Some("unc"), "train") => 120_624,
        ("refcoco", Some("unc"), "val") => 10_834,
        ("refcoco", Some("unc"), "testA") => 5_657,
        ("refcoco", Some("unc"), "testB") => 5_095,
        ("refcoco+", Some("unc"), "train") => 120_191,
        ("refcoco+", Some("unc"), "val") => 10_758,
        ("refcoco+", Some("unc"), "testA") => 5_726,
        ("refcoco+", Some("unc"), "testB") => 4_889,
        ("refcocog", Some("umd"), "train") => 80_512,
        ("refcocog", Some("umd"), "val") => 4_896,
        ("refcocog", Some("umd"), "test") => 9_602,
        ("referit", _, "train") => 54_127,
        ("referit", _, "val") => 5_842,
        ("referit", _, "test") => 60_103,
        ("flickr30k", _, "val") => 14_433,
        ("flickr30k", _, "test") => 14_481,
        _ => return None,
    })
}

#[derive(Default)]
struct SplitStats {
    exprs: usize,
    images: BTreeSet<String>,
    objects: BTreeSet<String>,
    dataset: String,
    split_by: Option<String>,
}

const LEN_BINS: usize = 16; // 1..=15 words, then 16+
const AREA_EDGES: [f64; 5] = [0.01, 0.05, 0.10, 0.25, 0.50];

pub fn stats(a: StatsArgs) -> Result<()> {
    let ds = Dataset::load(
        &a.file,
        None,
        &LoadOptions {
            skip_bad: true,
            check_images: false,
        },
    )?;
    let mut splits: BTreeMap<String, SplitStats> = BTreeMap::new();
    let mut lengths = [0usize; LEN_BINS];
    let (mut coco, mut rel) = ([0usize; 3], [0usize; AREA_EDGES.len() + 1]);
    let mut words_total = 0usize;
    for r in &ds.records {
        let s = splits.entry(r.split.clone()).or_default();
        s.exprs += 1;
        s.images.insert(r.image.clone());
        s.objects.insert(object_key(r));
        s.dataset.clone_from(&r.dataset);
        s.split_by.clone_from(&r.split_by);
        let n = r.expr.split_whitespace().count();
        words_total += n;
        lengths[n.clamp(1, LEN_BINS) - 1] += 1;
        let b = r.bbox_xyxy.map(f64::from);
        let area = (b[2] - b[0]) * (b[3] - b[1]);
        coco[usize::from(area >= 32.0 * 32.0) + usize::from(area >= 96.0 * 96.0)] += 1;
        if let (Some(w), Some(h)) = (r.width, r.height) {
            let frac = area / (f64::from(w) * f64::from(h));
            rel[AREA_EDGES.iter().filter(|&&e| frac >= e).count()] += 1;
        }
    }
    let n = ds.records.len();
    if a.json {
        let v = serde_json::json!({
            "file": a.file, "rows": n, "bad_lines": ds.skipped.len(),
            "splits": splits.iter().map(|(k, s)| (k.clone(), serde_json::json!({
                "expressions": s.exprs, "images": s.images.len(), "objects": s.objects.len(),
                "published_expressions": published_size(&s.dataset, s.split_by.as_deref(), k)}))).collect::<serde_json::Map<_, _>>(),
            "expression_words": {"mean": words_total as f64 / n as f64, "histogram_1_to_16plus": lengths},
            "box_area_coco": {"small": coco[0], "medium": coco[1], "large": coco[2]},
            "box_area_fraction": {"edges": AREA_EDGES, "counts": rel},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{}: {n} rows{}",
        a.file.display(),
        if ds.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} bad lines skipped", ds.skipped.len())
        }
    );
    for s in ds.skipped.iter().take(5) {
        println!("  line {}: {}", s.line, s.reason);
    }
    println!(
        "\n{:<10} {:>12} {:>8} {:>8} {:>22}",
        "split", "expressions", "images", "objects", "published (literature)"
    );
    let mut order: Vec<(&String, &SplitStats)> = splits.iter().collect();
    order.sort_by_key(|(k, _)| {
        ["train", "val", "testA", "testB", "test"]
            .iter()
            .position(|s| s == k)
            .unwrap_or(5)
    });
    for (k, s) in order {
        let p = published_size(&s.dataset, s.split_by.as_deref(), k).map_or("-".to_string(), |p| {
            format!("{p} ({:+})", s.exprs as i64 - p as i64)
        });
        println!(
            "{:<10} {:>12} {:>8} {:>8} {:>22}",
            k,
            s.exprs,
            s.images.len(),
            s.objects.len(),
            p
        );
    }
    println!(
        "\nexpression length (words), mean {:.2}",
        words_total as f64 / n.max(1) as f64
    );
    let label = |i: usize| {
        if i + 1 == LEN_BINS {
            format!("{}+", LEN_BINS)
        } else {
            format!("{}", i + 1)
        }
    };
    histogram(
        &lengths
            .iter()
            .enumerate()
            .map(|(i, &c)| (label(i), c))
            .collect::<Vec<_>>(),
    );
    println!("\nbox area (COCO sizes, pixels)");
    histogram(&[
        ("small <32²".into(), coco[0]),
        ("medium".into(), coco[1]),
        ("large >=96²".into(), coco[2]),
    ]);
    if rel.iter().sum::<usize>() > 0 {
        println!("\nbox area / image area (rows with a known image size)");
        let mut edges = vec![0.0];
        edges.extend(AREA_EDGES);
        let rows: Vec<(String, usize)> = rel
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                (
                    AREA_EDGES
                        .get(i)
                        .map_or(format!(">= {:.0}%", edges[i] * 100.0), |e| {
                            format!("{:.0}-{:.0}%", edges[i] * 100.0, e * 100.0)
                        }),
                    c,
                )
            })
            .collect();
        histogram(&rows);
    }
    Ok(())
}

/// One object: the annotation id when the source had one, else the image and box.
fn object_key(r: &Record) -> String {
    match r.extra.get("ann_id") {
        Some(id) => format!("ann:{id}"),
        None => format!("{}:{:?}", r.image, r.bbox_xyxy),
    }
}

fn histogram(rows: &[(String, usize)]) {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let total: usize = rows.iter().map(|r| r.1).sum::<usize>().max(1);
    for (label, c) in rows {
        let bar = "█".repeat((40 * c).div_ceil(max).min(40) * usize::from(*c > 0));
        println!(
            "  {label:>12} {c:>8} {:>5.1}% {bar}",
            100.0 * *c as f64 / total as f64
        );
    }
}
