//! The code-free torch checkpoint reader on the TransVG fixtures (written by torch 2.14 in
//! the zip container, by our byte-exact copy of torch's legacy writer in the old one; see
//! `tools/reference/make_transvg_fixtures.py`) and on hand-made hostile files.

use gk_data::pickle::Value;
use gk_data::pth::{self, Container, StorageDtype, TorchFile};
use std::io::Write;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/transvg")
}

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap()
}

#[test]
fn both_containers_give_every_tensor_of_the_state_dict() {
    let c = cases();
    for (file, container) in [
        ("r50_tiny.pth", Container::Zip),
        ("r101_tiny_legacy.pth", Container::Legacy),
        ("r50_tiny_dilated.pth", Container::Zip),
    ] {
        let want = &c["models"][file];
        let f = TorchFile::open(&fixtures().join(file)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.container(), container, "{file}");
        let Value::Dict(top) = f.object() else {
            panic!("{file}: top level is not a dict")
        };
        let keys: Vec<&str> = top.iter().filter_map(|(k, _)| k.as_str()).collect();
        let want_keys: Vec<&str> = want["top_level"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(keys, want_keys, "{file}");
        let sd = pth::state_dict(f.object().get("model").unwrap()).unwrap();
        assert_eq!(
            sd.len() as u64,
            want["n_tensors"].as_u64().unwrap(),
            "{file}"
        );
        let mut values = 0;
        for (name, t) in &sd {
            assert_eq!(t.dtype, StorageDtype::F32, "{name}");
            let v = f
                .read_f32(t)
                .unwrap_or_else(|e| panic!("{file} {name}: {e}"));
            assert_eq!(v.len(), t.numel());
            assert!(v.iter().all(|x| x.is_finite()), "{name}");
            values += v.len();
        }
        assert_eq!(values as u64, want["n_values"].as_u64().unwrap(), "{file}");
        // args: an argparse.Namespace, read as a dict
        let args = f.object().get("args").unwrap();
        assert_eq!(
            args.get("max_query_len").and_then(Value::as_f64),
            want["config"]["max_query_len"].as_f64(),
            "{file}"
        );
        assert!(args.get("dilation").is_some());
    }
}

#[test]
fn the_optimizer_state_decodes_but_is_never_read() {
    // torch>=1.12 AdamW: `step` is a 0-d tensor; the legacy file's is an int.
    for file in ["r50_tiny.pth", "r101_tiny_legacy.pth"] {
        let f = TorchFile::open(&fixtures().join(file)).unwrap();
        let opt = f.object().get("optimizer").unwrap();
        assert!(
            opt.get("state").is_some() && opt.get("param_groups").is_some(),
            "{file}"
        );
    }
}

/// A zip torch file `archive/data.pkl` with `pkl` and the given storages.
fn zip_file(dir: &Path, name: &str, pkl: &[u8], storages: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join(name);
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opt =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opt).unwrap();
    z.write_all(pkl).unwrap();
    for (key, data) in storages {
        z.start_file(format!("archive/data/{key}"), opt).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
    path
}

/// `OrderedDict(w=<float tensor of `size` over a storage of `numel`>)`, protocol 2, as
/// torch writes it, with `global` (and a MARK) where `_rebuild_tensor_v2` is named.
fn tensor_pickle(numel: u8, size: u8, global: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02ccollections\nOrderedDict\n)RX\x01\x00\x00\x00w".to_vec();
    p.extend_from_slice(global);
    // (storage persistent id, offset 0, size (n,), stride (1,), False, OrderedDict())
    p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x06\x00\x00\x00cuda:0K");
    p.push(numel);
    p.extend_from_slice(b"tQK\x00K");
    p.push(size);
    p.extend_from_slice(b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.");
    p
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn hand_made_files_read_and_hostile_ones_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let global = b"ctorch._utils\n_rebuild_tensor_v2\n(";
    let good = tensor_pickle(4, 4, global);
    let data = f32_bytes(&[1.5, -2.0, 3.25, 0.5]);
    let p = zip_file(dir.path(), "good.pth", &good, &[("0", &data)]);
    let f = TorchFile::open(&p).unwrap_or_else(|e| panic!("{e}"));
    let sd = pth::state_dict(f.object()).unwrap();
    assert_eq!(sd[0].0, "w");
    assert_eq!(sd[0].1.location, "cuda:0");
    assert_eq!(f.read_f32(&sd[0].1).unwrap(), vec![1.5, -2.0, 3.25, 0.5]);

    // the error of reading the one tensor of a written file
    let read_err = |name: &str, pkl: &[u8], storages: &[(&str, &[u8])]| {
        let f = TorchFile::open(&zip_file(dir.path(), name, pkl, storages)).unwrap();
        let sd = pth::state_dict(f.object()).unwrap();
        f.read_f32(&sd[0].1).unwrap_err().to_string()
    };
    // a tensor claiming more elements than its storage holds
    let e = read_err("short.pth", &tensor_pickle(4, 9, global), &[("0", &data)]);
    assert!(
        e.contains("short.pth") && e.contains("storage `0`") && e.contains("reaches element 9"),
        "{e}"
    );
    // a storage entry shorter than its persistent id says
    let e = read_err("cut.pth", &tensor_pickle(9, 9, global), &[("0", &data)]);
    assert!(e.contains("has 16 bytes"), "{e}");
    // a missing storage entry
    let e = read_err("nodata.pth", &good, &[]);
    assert!(e.contains("archive/data/0"), "{e}");
    // code in the pickle: named, never run
    let evil = tensor_pickle(4, 4, b"cposix\nsystem\n(");
    let p = zip_file(dir.path(), "evil.pth", &evil, &[("0", &data)]);
    let e = TorchFile::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("evil.pth") && e.contains("global `posix.system` is not allowed"),
        "{e}"
    );
    // a released file cut short (an interrupted download)
    let bytes = std::fs::read(fixtures().join("r50_tiny.pth")).unwrap();
    let p = dir.path().join("truncated.pth");
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = TorchFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("broken zip container"), "{e}");
    let bytes = std::fs::read(fixtures().join("r101_tiny_legacy.pth")).unwrap();
    let p = dir.path().join("legacy_cut.pth");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = TorchFile::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("truncated file") && e.contains("legacy_cut.pth"),
        "{e}"
    );
    // split-file readers still refuse tensors
    let e = pth::read(&fixtures().join("r50_tiny.pth"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor storages"), "{e}");
}

/// Mutated checkpoints (bit flips, byte runs, truncations) open and read to a value or an
/// error, never a panic, a hang or an absurd allocation. `GK_FUZZ_ITERS` runs it longer.
#[test]
fn mutated_checkpoints_never_panic() {
    use rand::{Rng, SeedableRng};
    let iters: usize = std::env::var("GK_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let seeds: Vec<Vec<u8>> = ["r101_tiny_legacy.pth", "r50_tiny_dilated.pth"]
        .iter()
        .map(|f| std::fs::read(fixtures().join(f)).unwrap())
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (mut ok, mut errs) = (0, 0);
    for i in 0..iters {
        let mut d = seeds[i % seeds.len()].clone();
        // the pickles lie in the first few KB of a legacy file: aim most mutations there
        let hot = if d.starts_with(b"PK") {
            d.len()
        } else {
            20_000.min(d.len())
        };
        for _ in 0..rng.random_range(1..4) {
            let p = rng
                .random_range(0..hot.min(d.len()).max(1))
                .min(d.len().saturating_sub(1));
            match rng.random_range(0..4) {
                _ if d.is_empty() => {}
                0 => d[p] ^= 1 << rng.random_range(0..8),
                1 => d[p] = rng.random(),
                2 => d.truncate(rng.random_range(p.max(1)..=d.len())),
                _ => {
                    for (k, b) in [0xffu8, 0xff, 0xff, 0x7f].iter().enumerate() {
                        if let Some(x) = d.get_mut(p + k) {
                            *x = *b;
                        }
                    }
                }
            }
        }
        let res = TorchFile::from_bytes(d, Path::new("fuzz.pth")).and_then(|f| {
            let model = f.object().get("model").cloned().unwrap_or(Value::None);
            for (_, t) in pth::state_dict(&model).unwrap_or_default() {
                f.read_f32(&t)?;
            }
            Ok(())
        });
        match res {
            Ok(()) => ok += 1,
            Err(_) => errs += 1,
        }
    }
    assert_eq!(ok + errs, iters);
    assert!(errs > 0, "mutations should break some files");
}
