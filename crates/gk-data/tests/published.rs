//! Published split formats against what the Python loaders produce.
//!
//! Fixtures and their `.expected.json` come from `tools/reference/make_split_fixtures.py`
//! (torch.save in both containers, numpy boxes, the refer layout in protocol 2 and in
//! Python 2's protocol 0, and hostile files).

use gk_data::pickle::{self, PickleError};
use gk_data::pth::{self, Container};
use gk_data::published::{self, DatasetKey};
use gk_data::refer::{self, ReferSource};
use gk_data::DataError;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/splits")
}

fn expected(path: &Path) -> Vec<serde_json::Value> {
    let p = PathBuf::from(format!("{}.expected.json", path.display()));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn strip_root(image: &str) -> &str {
    image.rsplit_once('/').map_or(image, |(_, f)| f)
}

#[test]
fn pth_rows_equal_the_python_loaders_rows() {
    let cases = [
        ("unc/unc_val.pth", DatasetKey::Unc, Container::Zip),
        ("unc/unc_testA.pth", DatasetKey::Unc, Container::Legacy),
        ("flickr/flickr_test.pth", DatasetKey::Flickr, Container::Zip),
        (
            "flickr/flickr_val.pth",
            DatasetKey::Flickr,
            Container::Legacy,
        ),
        (
            "referit/referit_test.pth",
            DatasetKey::Referit,
            Container::Zip,
        ),
        ("hivg/unc_train.pth", DatasetKey::Unc, Container::Zip),
        ("mixup/mixup_train.pth", DatasetKey::Mixup, Container::Zip),
    ];
    for (file, key, container) in cases {
        let path = fixtures().join(file);
        let (v, c) = pth::read(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c, container, "{file}");
        let conv = published::convert_split_list(&v, key, "val", &path, false, 0).unwrap();
        let want = expected(&path);
        assert_eq!(conv.records.len(), want.len(), "{file}");
        for (r, w) in conv.records.iter().zip(&want) {
            let at = format!("{file} row {}", w["row"]);
            // what convert writes must load: the canonical loader's checks pass
            gk_data::dataset::check_record(r, Path::new(""), false)
                .unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_eq!(strip_root(&r.image), w["image"].as_str().unwrap(), "{at}");
            assert_eq!(r.expr, w["expr"].as_str().unwrap(), "{at}");
            let raw: Vec<f64> = serde_json::from_value(r.extra["bbox_raw"].clone()).unwrap();
            // serde_json's float parsing is not always correctly rounded: 1e-12 relative.
            for (a, b) in raw.iter().zip(f64s(&w["bbox_raw"])) {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    "{at}: {raw:?} vs {}",
                    w["bbox_raw"]
                );
            }
            for (a, b) in r.bbox_xyxy.iter().zip(f64s(&w["bbox_xyxy"])) {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{at}: {:?} vs {}",
                    r.bbox_xyxy,
                    w["bbox_xyxy"]
                );
            }
            let int =
                published::transvg_int_box(raw.clone().try_into().unwrap(), r.bbox_src == "xywh");
            assert_eq!(
                int.to_vec(),
                f64s(&w["bbox_int_xyxy"]),
                "{at}: TransVG's int box"
            );
            if let Some(src) = w.get("source") {
                assert_eq!(r.extra["source"], *src, "{at}");
                let root = match src.as_str().unwrap() {
                    "coco" => "coco/train2014/",
                    "flickr" => "flickr30k/images/",
                    _ => "referit/images/",
                };
                assert!(r.image.starts_with(root), "{at}: {}", r.image);
            }
        }
    }
}

#[test]
fn refer_rows_equal_the_refer_api_rows() {
    for (dir, split_by) in [("refer/refcoco", "unc"), ("refer/refcocog", "umd")] {
        let src = ReferSource::in_dir(&fixtures().join(dir), split_by);
        let conv = refer::read(&src, None, false).unwrap_or_else(|e| panic!("{e}"));
        let want = expected(&src.refs);
        assert_eq!(conv.records.len(), want.len(), "{dir}");
        for (r, w) in conv.records.iter().zip(&want) {
            gk_data::dataset::check_record(r, Path::new(""), false)
                .unwrap_or_else(|e| panic!("{dir} {}: {e}", r.id));
            assert_eq!(strip_root(&r.image), w["image"].as_str().unwrap());
            assert_eq!(r.expr, w["expr"].as_str().unwrap());
            assert_eq!(r.split, w["split"].as_str().unwrap());
            for k in ["image_id", "ann_id", "ref_id", "sent_id", "category_id"] {
                assert_eq!(r.extra[k], w[k], "{dir} {k}");
            }
            assert_eq!(r.width.map(u64::from), w["width"].as_u64());
            for (a, b) in r.bbox_xyxy.iter().zip(f64s(&w["bbox_xyxy"])) {
                assert!((f64::from(*a) - b).abs() <= 1e-4 * b.abs().max(1.0));
            }
        }
        // One split only.
        let val = refer::read(&src, Some("val"), false).unwrap();
        assert_eq!(
            val.records.len(),
            want.iter().filter(|w| w["split"] == "val").count()
        );
    }
}

fn err(file: &str, key: DatasetKey) -> DataError {
    let path = fixtures().join("hostile").join(file);
    match pth::read(&path) {
        Err(e) => e,
        Ok((v, _)) => {
            published::convert_split_list(&v, key, "val", &path, false, 0).expect_err(file)
        }
    }
}

#[test]
fn hostile_files_are_clear_errors() {
    for (file, needle) in [
        ("truncated.pth", "broken zip container"),
        ("legacy_truncated.pth", "truncated"),
        ("bad_magic.pth", "not a torch .pth file"),
        ("evil_global.pth", "global `posix.system` is not allowed"),
        (
            "evil_stack_global.pth",
            "global `posix.system` is not allowed",
        ),
        ("bad_arity.pth", "row 1: has 4 items"),
        ("nan_box.pth", "row 1: box"),
        ("negative_box.pth", "row 2: xywh box"),
    ] {
        let e = err(file, DatasetKey::Unc).to_string();
        assert!(e.contains(file), "{file}: the error names the file: {e}");
        assert!(e.contains(needle), "{file}: `{needle}` not in: {e}");
    }
    // --skip-bad: the bad row is counted, the good ones kept.
    let path = fixtures().join("hostile/nan_box.pth");
    let (v, _) = pth::read(&path).unwrap();
    let conv = published::convert_split_list(&v, DatasetKey::Unc, "val", &path, true, 0).unwrap();
    assert_eq!(conv.skipped.len(), 1);
    assert_eq!(conv.skipped[0].line, 1);
    assert!(!conv.records.is_empty());
    // A ref without sentences.
    let dir = fixtures().join("refer/refcoco");
    let src = ReferSource {
        refs: fixtures().join("hostile/bad_refs.p"),
        ..ReferSource::in_dir(&dir, "unc")
    };
    let e = refer::read(&src, None, false).unwrap_err().to_string();
    assert!(
        e.contains("bad_refs.p") && e.contains("row 1") && e.contains("sentences"),
        "{e}"
    );
}

/// Mutated fixtures (bit flips, byte runs, truncations, splices) must give a value or an
/// error, never a panic or a hang. `GK_FUZZ_ITERS` runs it longer.
#[test]
fn mutated_split_files_never_panic() {
    let iters: usize = std::env::var("GK_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let seeds: Vec<Vec<u8>> = [
        "unc/unc_val.pth",
        "unc/unc_testA.pth",
        "flickr/flickr_test.pth",
        "flickr/flickr_val.pth",
        "mixup/mixup_train.pth",
        "refer/refcocog/refs(umd).p",
    ]
    .iter()
    .map(|f| std::fs::read(fixtures().join(f)).unwrap())
    .collect();
    // The pickles alone too (data.pkl of a zip file is not reached by most zip mutations).
    let mut pickles: Vec<Vec<u8>> = seeds
        .iter()
        .filter(|s| !s.starts_with(b"PK"))
        .cloned()
        .collect();
    pickles.push(std::fs::read(fixtures().join("refer/refcoco/refs(unc).p")).unwrap());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut ok, mut errs) = (0usize, 0usize);
    for i in 0..iters {
        let pool = if i % 2 == 0 { &seeds } else { &pickles };
        let mut d = pool[rng.random_range(0..pool.len())].clone();
        for _ in 0..rng.random_range(1..6) {
            let n = d.len().max(1);
            match rng.random_range(0..5) {
                0 => {
                    let p = rng.random_range(0..n);
                    if let Some(b) = d.get_mut(p) {
                        *b ^= 1 << rng.random_range(0..8);
                    }
                }
                1 => {
                    let p = rng.random_range(0..n);
                    if let Some(b) = d.get_mut(p) {
                        *b = rng.random();
                    }
                }
                2 => d.truncate(rng.random_range(0..n)),
                3 => {
                    let p = rng.random_range(0..n).min(d.len());
                    let run: Vec<u8> = (0..rng.random_range(1..9)).map(|_| rng.random()).collect();
                    d.splice(p..p, run);
                }
                _ => {
                    // Overwrite with a length-ish field to provoke huge allocations.
                    let p = rng.random_range(0..n);
                    for (k, b) in [0xffu8, 0xff, 0xff, 0x7f].iter().enumerate() {
                        if let Some(x) = d.get_mut(p + k) {
                            *x = *b;
                        }
                    }
                }
            }
        }
        let res = if i % 2 == 0 {
            pth::decode(&d, Path::new("fuzz.pth")).map(|_| ())
        } else {
            pickle::loads(&d)
                .map(|_| ())
                .map_err(|e: PickleError| DataError::Format {
                    path: "fuzz".into(),
                    msg: e.to_string(),
                })
        };
        match res {
            Ok(()) => ok += 1,
            Err(_) => errs += 1,
        }
    }
    eprintln!("fuzz: {iters} mutated inputs, {ok} decoded, {errs} clear errors, 0 panics");
    assert_eq!(ok + errs, iters);
}
