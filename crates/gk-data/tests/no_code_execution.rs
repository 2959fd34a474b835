//! No file can make groundkit run code: pickles that name `os.system`, `builtins.eval`,
//! `subprocess.Popen`, `posix.system` and other callables outside the allowed list (plain
//! data, numpy arrays, torch tensors and storages, `OrderedDict`, `argparse.Namespace`),
//! through GLOBAL, STACK_GLOBAL or INST, as a bare pickle, a refer `refs(*).p`, a split
//! `.pth` and a checkpoint in both torch containers, are refused with the global's name.
//! The files are built here, byte by byte, so the collection needs no Python.

use gk_data::pth::TorchFile;
use std::io::Write;
use std::path::Path;

/// `(module, name)` of the callables a hostile file may name.
const HOSTILE: &[(&str, &str)] = &[
    ("os", "system"),
    ("posix", "system"),
    ("nt", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("__builtin__", "eval"),
    ("subprocess", "Popen"),
    ("subprocess", "check_output"),
    ("runpy", "_run_code"),
    ("pty", "spawn"),
    ("webbrowser", "open"),
    ("torch", "load"),
    ("torch.hub", "load"),
    ("numpy", "load"),
    ("pickle", "loads"),
    ("collections", "Counter"),
];

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![0x8c, s.len() as u8]; // SHORT_BINUNICODE
    v.extend_from_slice(s.as_bytes());
    v
}

/// `{"model": <call>}` where `<call>` is `module.name("echo pwned")` via `how`.
fn pickle(module: &str, name: &str, how: &str) -> Vec<u8> {
    let mut p = vec![0x80, 4, b'}']; // PROTO 4, EMPTY_DICT
    p.extend(unicode("model"));
    match how {
        "global" => p.extend(format!("c{module}\n{name}\n").bytes()),
        "stack_global" => {
            p.extend(unicode(module));
            p.extend(unicode(name));
            p.push(0x93);
        }
        _ => {}
    }
    match how {
        "inst" => {
            p.push(b'(');
            p.extend(unicode("echo pwned"));
            p.extend(format!("i{module}\n{name}\n").bytes());
        }
        _ => {
            p.extend(unicode("echo pwned"));
            p.extend([0x85, b'R']); // TUPLE1, REDUCE
        }
    }
    p.extend([b's', b'.']); // SETITEM, STOP
    p
}

/// The pickle as a torch zip checkpoint (`archive/data.pkl`, stored).
fn zip_file(pkl: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pkl).unwrap();
    w.start_file("archive/version", opts).unwrap();
    w.write_all(b"3\n").unwrap();
    w.finish().unwrap().into_inner()
}

/// The pickle as a legacy torch file: the magic number, protocol and system-info pickles,
/// then the hostile object.
fn legacy_file(pkl: &[u8]) -> Vec<u8> {
    let mut v = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    v.extend(b"\x80\x02M\xe9\x03."); // protocol version 1001
    v.extend(b"\x80\x02}q\x00."); // sys_info: {}
    v.extend_from_slice(pkl);
    v.extend(b"\x80\x02]q\x00."); // storage keys: []
    v
}

fn refused_naming(e: impl std::fmt::Display, module: &str, name: &str, what: &str) {
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("`{module}.{name}`")) && msg.contains("not allowed"),
        "{what}: {msg}"
    );
}

#[test]
fn hostile_globals_are_refused_by_name_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for &(module, name) in HOSTILE {
        for how in ["global", "stack_global", "inst"] {
            let pkl = pickle(module, name, how);
            let what = format!("{module}.{name} by {how}");
            refused_naming(
                gk_data::pickle::loads(&pkl).unwrap_err(),
                module,
                name,
                &what,
            );
            for (kind, bytes) in [("zip", zip_file(&pkl)), ("legacy", legacy_file(&pkl))] {
                let e = TorchFile::from_bytes(bytes, Path::new("evil.pth"))
                    .err()
                    .unwrap_or_else(|| panic!("{what} in a {kind} file was accepted"));
                refused_naming(e, module, name, &format!("{what} ({kind})"));
            }
            // a refer annotation file and a split list
            let refs = dir.path().join("refcoco");
            std::fs::create_dir_all(&refs).unwrap();
            std::fs::write(refs.join("refs(unc).p"), &pkl).unwrap();
            std::fs::write(
                refs.join("instances.json"),
                br#"{"images":[],"annotations":[]}"#,
            )
            .unwrap();
            let src = gk_data::refer::ReferSource::in_dir(&refs, "unc");
            let e = gk_data::refer::read(&src, None, false).unwrap_err();
            refused_naming(e, module, name, &format!("{what} (refs)"));
            checked += 1;
        }
    }
    assert_eq!(checked, HOSTILE.len() * 3);
}

#[test]
fn allowed_globals_still_load() {
    // OrderedDict and argparse.Namespace are data, not code
    let mut od = vec![0x80, 2];
    od.extend(b"ccollections\nOrderedDict\n)R.");
    assert!(gk_data::pickle::loads(&od).is_ok());
    let mut ns = vec![0x80, 2];
    ns.extend(b"cargparse\nNamespace\n)\x81}b.");
    assert!(gk_data::pickle::loads(&ns).is_ok());
}
