//! Fuzzing the parsers that read strangers' files: structure-aware random mutation of valid
//! seed files (stable Rust has no coverage-guided fuzzer without a nightly toolchain or
//! LLVM's libFuzzer; `cargo fuzz` needs both), one [`Target`] per input kind, and a runner
//! ([`run`]) that counts inputs and fails on a panic, a slow input (over a time bound), or
//! an allocation over a bound (a file that claims gigabytes), saving each failing input.
//!
//! Mutations ([`Mutator`]), one to four per input on a seed: bit flips, bytes set to edge
//! values, 1/2/4/8-byte integers overwritten with edge values (0, -1, 2^31, 2^63, ...), a
//! decimal number in text replaced by an edge value (`-1`, `1e999`, `NaN`, 20 digits), chunks
//! deleted, duplicated or spliced in from another seed, truncation. Every draw is seeded:
//! `(seed, target)` replays a run exactly.
//!
//! Memory is measured as the growth of the process's peak resident size over each input
//! (Linux's `VmHWM`, reset before every input through `/proc/self/clear_refs`; the project
//! forbids `unsafe`, so no counting allocator): a parser that believes a length field and
//! fills gigabytes shows; one that only reserves untouched address space does not, but the
//! allocator then fails and the run aborts, which fails it too.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `(resident now, peak resident)` of this process in bytes, from `/proc/self/status`
/// (Linux; `None` elsewhere).
fn rss() -> Option<(usize, usize)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = |key: &str| -> Option<usize> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let n: usize = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(n << 10)
    };
    Some((kb("VmRSS:")?, kb("VmHWM:")?))
}

/// Resets the peak resident size to the current one (Linux: `/proc/self/clear_refs`).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The seeded mutation engine.
pub struct Mutator {
    rng: ChaCha8Rng,
}

const EDGE_INTS: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];
const EDGE_TEXT: [&str; 9] = [
    "-1",
    "0",
    "1e999",
    "-1e999",
    "NaN",
    "99999999999999999999",
    "4294967296",
    "1.5",
    "",
];

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A mutant of `seed` (1 to 4 stacked mutations), at most `max_len` bytes; `others`
    /// are the other seeds, for splicing.
    pub fn mutate(&mut self, seed: &[u8], others: &[Vec<u8>], max_len: usize) -> Vec<u8> {
        let mut x = seed.to_vec();
        for _ in 0..self.rng.random_range(1..=4) {
            self.one(&mut x, others);
        }
        x.truncate(max_len);
        x
    }

    fn pos(&mut self, len: usize) -> usize {
        if len == 0 {
            0
        } else {
            self.rng.random_range(0..len)
        }
    }

    fn one(&mut self, x: &mut Vec<u8>, others: &[Vec<u8>]) {
        let n = x.len();
        match self.rng.random_range(0..8) {
            0 if n > 0 => {
                let i = self.pos(n);
                x[i] ^= 1 << self.rng.random_range(0..8);
            }
            1 if n > 0 => {
                let i = self.pos(n);
                x[i] =
                    [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'\\'][self.rng.random_range(0..8)];
            }
            2 if n >= 8 => {
                let width = [1usize, 2, 4, 8][self.rng.random_range(0..4)];
                let i = self.pos(n - width + 1);
                let v = EDGE_INTS[self.rng.random_range(0..EDGE_INTS.len())];
                let bytes = match self.rng.random_bool(0.5) {
                    true => v.to_le_bytes(),
                    false => v.to_be_bytes(),
                };
                x[i..i + width].copy_from_slice(&bytes[..width]);
            }
            3 => {
                // a decimal number (in text formats) -> an edge value
                let starts: Vec<usize> = (0..n)
                    .filter(|&i| x[i].is_ascii_digit() && (i == 0 || !x[i - 1].is_ascii_digit()))
                    .collect();
                if let Some(&s) = starts.get(self.pos(starts.len())) {
                    let e = (s..n).find(|&i| !x[i].is_ascii_digit()).unwrap_or(n);
                    let v = EDGE_TEXT[self.rng.random_range(0..EDGE_TEXT.len())];
                    x.splice(s..e, v.bytes());
                }
            }
            4 if n > 0 => {
                let i = self.pos(n);
                let len = self.rng.random_range(1..=(n - i).min(64));
                x.drain(i..i + len);
            }
            5 if n > 0 => {
                let i = self.pos(n);
                let len = self.rng.random_range(1..=(n - i).min(256));
                let chunk = x[i..i + len].to_vec();
                let at = self.pos(n + 1);
                x.splice(at..at, chunk);
            }
            6 if !others.is_empty() => {
                let o = &others[self.pos(others.len())];
                if !o.is_empty() {
                    let i = self.pos(o.len());
                    let len = self.rng.random_range(1..=(o.len() - i).min(256));
                    let at = self.pos(n + 1);
                    let end = (at + len).min(n);
                    x.splice(at..end, o[i..i + len].iter().copied());
                }
            }
            _ => {
                let at = self.pos(n + 1);
                x.truncate(at);
            }
        }
    }
}

/// PNG mutants with their chunk checksums recomputed, so that a mutation reaches the
/// decoder's parsing of the chunk instead of its CRC check (chunks whose length field no
/// longer fits are left as they are).
fn fix_png_crcs(mut x: Vec<u8>) -> Vec<u8> {
    let mut at = 8;
    while at + 12 <= x.len() {
        let len = u32::from_be_bytes([x[at], x[at + 1], x[at + 2], x[at + 3]]) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e + 4 <= x.len()) else {
            break;
        };
        let crc = crc32fast::hash(&x[at + 4..end]);
        x[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
    x
}

/// A parser under test: parse bytes, `Err` for a clean refusal.
pub type Parse = Box<dyn Fn(&[u8]) -> Result<(), String>>;

/// One input kind: its seeds and its parser.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    pub parse: Parse,
}

/// What a run found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub target: String,
    pub inputs: u64,
    /// Inputs the parser accepted, and those it refused with an error.
    pub accepted: u64,
    pub refused: u64,
    /// Failures: `(kind, message, saved input)`, kind `panic`, `slow` or `memory`.
    pub failures: Vec<(String, String, Option<PathBuf>)>,
    /// The slowest input, ms, and the largest growth of resident memory over one input,
    /// bytes (`None`: not measurable on this system).
    pub slowest_ms: f64,
    pub max_rss_growth: Option<usize>,
}

/// Bounds of a run.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub inputs: u64,
    pub seed: u64,
    /// An input longer than this is a failure (`slow`).
    pub time: Duration,
    /// Resident memory growing by more than this over one input is a failure (`memory`).
    pub memory: usize,
    /// Mutants are cut to this length.
    pub max_len: usize,
    /// Where failing inputs are written (`<target>-<n>.bin`); none: not saved.
    pub save: Option<PathBuf>,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            inputs: 1000,
            seed: 0,
            time: Duration::from_secs(2),
            memory: 256 << 20,
            max_len: 1 << 20,
            save: None,
        }
    }
}

/// Runs `target` on `bounds.inputs` mutants of its seeds (the seeds themselves first).
/// `progress(done)` is called every 1000 inputs.
pub fn run(target: &Target, bounds: &Bounds, mut progress: impl FnMut(u64)) -> Report {
    let mut report = Report {
        target: target.name.to_string(),
        ..Default::default()
    };
    if target.seeds.is_empty() {
        report
            .failures
            .push(("setup".into(), "no seed files".into(), None));
        return report;
    }
    let name_hash = target
        .name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut m = Mutator::new(bounds.seed ^ name_hash);
    let measure = reset_peak();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..bounds.inputs {
        let input = match target.seeds.get(i as usize) {
            Some(s) => s.clone(),
            None => {
                let s = &target.seeds[m.pos(target.seeds.len())];
                m.mutate(s, &target.seeds, bounds.max_len)
            }
        };
        let base = (measure && reset_peak()).then(rss).flatten();
        let t0 = Instant::now();
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.parse)(&input)));
        let took = t0.elapsed();
        let growth = base.and_then(|(now, _)| rss().map(|(_, peak)| peak.saturating_sub(now)));
        if let Some(g) = growth {
            report.max_rss_growth = Some(report.max_rss_growth.unwrap_or(0).max(g));
        }
        report.slowest_ms = report.slowest_ms.max(took.as_secs_f64() * 1e3);
        report.inputs += 1;
        let mut fail = |kind: &str, msg: String| {
            let saved = bounds.save.as_ref().and_then(|dir| {
                let p = dir.join(format!("{}-{}-{i}.bin", target.name, kind));
                std::fs::create_dir_all(dir).ok()?;
                std::fs::write(&p, &input).ok().map(|_| p)
            });
            report.failures.push((kind.to_string(), msg, saved));
        };
        match out {
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(_)) => report.refused += 1,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                fail("panic", msg);
            }
        }
        if took > bounds.time {
            fail("slow", format!("{:.0} ms", took.as_secs_f64() * 1e3));
        }
        if let Some(g) = growth.filter(|&g| g > bounds.memory) {
            fail("memory", format!("resident memory grew by {} MB", g >> 20));
        }
        if (i + 1) % 1000 == 0 {
            progress(i + 1);
        }
    }
    std::panic::set_hook(quiet);
    report
}

fn read_files(paths: impl IntoIterator<Item = PathBuf>) -> Vec<Vec<u8>> {
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// The files under `dir` (recursively) whose name ends with one of `suffixes`, sorted.
fn files(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if suffixes.iter().any(|s| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(s))
            }) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The pickles inside torch zip files (their `*/data.pkl` entries).
fn zip_pickles(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    for p in paths {
        let Ok(f) = std::fs::File::open(p) else {
            continue;
        };
        let Ok(mut z) = zip::ZipArchive::new(f) else {
            continue;
        };
        for i in 0..z.len() {
            let Ok(mut e) = z.by_index(i) else { continue };
            let is_pickle = e.name().is_ok_and(|n| n.ends_with("data.pkl"));
            if is_pickle && e.size() < (1 << 20) {
                let mut buf = Vec::new();
                if e.read_to_end(&mut buf).is_ok() {
                    out.push(buf);
                }
            }
        }
    }
    out
}

/// A scratch file for the parsers that read paths.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gk-fuzz-{}-{name}", std::process::id()))
}

/// The targets of this crate, seeded from the repository's fixtures under `root` (the
/// repository root): `pickle`, `torch` (both containers, every tensor read), `jsonl`,
/// `refer-refs` and `coco-instances` (the refer layout), `referit`, `flickr-sentences`,
/// `flickr-annotation`, `tokenizer`, `safetensors`, `image`.
pub fn targets(root: &Path) -> Vec<Target> {
    let fx = root.join("tests/fixtures");
    let splits = root.join("crates/gk-data/tests/fixtures/splits");
    let pth = files(&splits, &[".pth"])
        .into_iter()
        .chain(files(&fx.join("transvg"), &["tiny.pth", "missing_key.pth"]))
        .chain(files(&fx.join("mmdet_swin"), &[".pth"]))
        .collect::<Vec<_>>();
    let mut pickles = zip_pickles(&pth);
    pickles.extend(read_files(files(&splits, &[".p"])));
    let refer = splits.join("refer/refcoco");
    let mut out = vec![
        Target {
            name: "pickle",
            seeds: pickles,
            parse: Box::new(|b| crate::pickle::loads(b).map(|_| ()).map_err(|e| e.to_string())),
        },
        Target {
            name: "torch",
            seeds: read_files(pth.iter().filter(|p| {
                std::fs::metadata(p).is_ok_and(|m| m.len() < (2 << 20))
            }).cloned()),
            parse: Box::new(|b| {
                let f = crate::pth::TorchFile::from_bytes(b.to_vec(), Path::new("fuzz.pth"))
                    .map_err(|e| e.to_string())?;
                let mut ts = Vec::new();
                crate::pth::tensors(f.object(), &mut ts);
                for t in ts {
                    f.read_f32(t).map_err(|e| e.to_string())?;
                }
                Ok(())
            }),
        },
        Target {
            name: "jsonl",
            seeds: vec![
                br#"{"id":"a/0","dataset":"t","split":"val","image":"x.png","bbox_xyxy":[1,2,30,40],"expr":"the man on the left"}
{"id":"a/1","dataset":"t","split":"val","image":"x.png","width":64,"height":48,"bbox_xyxy":[0.5,2,63,47.5],"bbox_src":"xywh","expr":"red","extra":{"type":"color","phrases":["red"]}}
"#
                .to_vec(),
            ],
            parse: Box::new(|b| {
                let p = scratch("set.jsonl");
                std::fs::write(&p, b).map_err(|e| e.to_string())?;
                let opts = crate::dataset::LoadOptions {
                    check_images: false,
                    ..Default::default()
                };
                crate::dataset::Dataset::load(&p, None, &opts)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        },
    ];
    // the refer layout: one file mutated, the other as committed
    for (name, mutated) in [
        ("refer-refs", "refs(unc).p"),
        ("coco-instances", "instances.json"),
    ] {
        let src = refer.clone();
        out.push(Target {
            name,
            seeds: read_files([refer.join(mutated)]),
            parse: Box::new(move |b| {
                let dir = scratch(name).join("refcoco");
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                for f in ["refs(unc).p", "instances.json"] {
                    if f == mutated {
                        std::fs::write(dir.join(f), b).map_err(|e| e.to_string())?;
                    } else if !dir.join(f).exists() {
                        std::fs::copy(src.join(f), dir.join(f)).map_err(|e| e.to_string())?;
                    }
                }
                let s = crate::refer::ReferSource::in_dir(&dir, "unc");
                crate::refer::read(&s, None, false)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        });
    }
    out.extend([
        Target {
            name: "referit",
            seeds: vec![
                br#"{"8756_1.png": ["sky", "the blue sky above"], "8756_2.png": ["left tree"], "99_3.png": ["person"]}"#.to_vec(),
            ],
            parse: Box::new(|b| {
                let dir = scratch("referit");
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                std::fs::write(dir.join("referit_query_test.json"), b).map_err(|e| e.to_string())?;
                std::fs::write(
                    dir.join("referit_bbox.json"),
                    br#"{"8756_1.png": [0, 0, 480, 120], "8756_2.png": [3, 40, 90, 300], "99_3.png": [10.5, 20, 30, 60]}"#,
                )
                .map_err(|e| e.to_string())?;
                crate::referit::read(&dir, "test", false)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        },
        Target {
            name: "flickr-sentences",
            seeds: vec![b"[/EN#18/people A man] in [/EN#19/clothing an orange hat] starring at [/EN#20/other something] .\n[/EN#0/notvisual It] is [/EN#21/scene/other a sunny day] .\n".to_vec()],
            parse: Box::new(|b| {
                crate::entities::parse_sentences(&String::from_utf8_lossy(b), Path::new("s.txt"))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        },
        Target {
            name: "flickr-annotation",
            seeds: vec![b"<annotation><filename>1.jpg</filename><size><width>500</width><height>333</height><depth>3</depth></size><object><name>18</name><name>19</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>300</xmax><ymax>200</ymax></bndbox></object><object><name>21</name><nobndbox>1</nobndbox></object><object><name>20</name><scene>1</scene></object></annotation>".to_vec()],
            parse: Box::new(|b| {
                crate::entities::parse_annotation(&String::from_utf8_lossy(b), Path::new("a.xml"))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        },
        Target {
            name: "tokenizer",
            seeds: read_files(files(&fx.join("tokenizers"), &["tokenizer.json"])),
            parse: Box::new(|b| {
                let t = crate::tokenize::TextTokenizer::from_bytes(b, Path::new("tokenizer.json"))
                    .map_err(|e| e.to_string())?;
                t.encode("the man in red, on the left!", 20)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        },
        Target {
            name: "safetensors",
            seeds: read_files(
                files(&fx, &[".safetensors"])
                    .into_iter()
                    .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() < (512 << 10))),
            ),
            parse: Box::new(|b| {
                candle_core::safetensors::load_buffer(b, &candle_core::Device::Cpu)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        },
        Target {
            name: "image",
            seeds: read_files(files(&fx.join("transvg/images"), &[".png"])),
            parse: Box::new(|b| {
                crate::image_io::decode_rgb(&fix_png_crcs(b.to_vec()))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        },
    ]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_seeded_and_bounded() {
        let seed = b"{\"a\": [1, 22, 333], \"b\": \"text\"}".to_vec();
        let others = vec![b"xyz 42".to_vec()];
        let a: Vec<Vec<u8>> = {
            let mut m = Mutator::new(7);
            (0..50).map(|_| m.mutate(&seed, &others, 40)).collect()
        };
        let b: Vec<Vec<u8>> = {
            let mut m = Mutator::new(7);
            (0..50).map(|_| m.mutate(&seed, &others, 40)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|x| x.len() <= 40));
        assert!(a.iter().filter(|x| **x != seed).count() > 40);
    }

    #[test]
    fn a_panicking_parser_is_caught_and_counted() {
        let t = Target {
            name: "toy",
            seeds: vec![b"ok".to_vec()],
            parse: Box::new(|b| {
                if b.len() > 3 {
                    panic!("too long");
                }
                Err("refused".into())
            }),
        };
        let r = run(
            &t,
            &Bounds {
                inputs: 200,
                ..Default::default()
            },
            |_| {},
        );
        assert_eq!(r.inputs, 200);
        assert!(r
            .failures
            .iter()
            .any(|f| f.0 == "panic" && f.1 == "too long"));
        assert_eq!(
            r.refused + r.failures.iter().filter(|f| f.0 == "panic").count() as u64,
            200
        );
    }
}
