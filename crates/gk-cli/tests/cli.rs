//! The real `groundkit` binary in temp folders: success paths print what they promise,
//! bad input exits non-zero with a message naming the culprit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn groundkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_groundkit"))
        .args(args)
        .output()
        .expect("run groundkit")
}

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(p)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.contains(needle),
        "stderr does not mention {needle:?}: {err}"
    );
}

/// A Hugging Face-style CLIP folder: the tiny random CLIP fixture plus a word-level
/// tokenizer whose ids fit its 1000-token vocabulary (998/999 = start/end of text).
fn clip_dir(dir: &Path) -> PathBuf {
    let d = dir.join("clip");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(&format!("clip_tiny/{f}")), d.join(f)).unwrap();
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>", "vocab": {
            "<unk>": 3, "a": 10, "red": 11, "circle": 12, "on": 13, "the": 14, "left": 15,
            "<|startoftext|>": 998, "<|endoftext|>": 999}}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    d
}

fn png(dir: &Path) -> PathBuf {
    let p = dir.join("img.png");
    image::RgbImage::from_fn(50, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, 90])
    })
    .save(&p)
    .unwrap();
    p
}

#[test]
fn help_is_useful() {
    let o = groundkit(&["--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for cmd in [
        "demo",
        "synth",
        "train",
        "eval",
        "predict",
        "embed",
        "bench",
        "convert",
        "stats",
        "pretrain-teacher",
        "ablate",
    ] {
        assert!(out.contains(cmd), "--help lacks {cmd}: {out}");
    }
    let o = groundkit(&["embed", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("--model"));
}

#[test]
fn embed_prints_normalised_embeddings_and_cosine() {
    let dir = tempfile::tempdir().unwrap();
    let (m, img) = (clip_dir(dir.path()), png(dir.path()));
    let o = groundkit(&[
        "embed",
        "--model",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--text",
        "a red circle on the left",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let norm = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap().powi(2))
            .sum::<f64>()
            .sqrt()
    };
    assert_eq!(v["image_embedding"].as_array().unwrap().len(), 24);
    assert!(
        (norm("image_embedding") - 1.0).abs() < 1e-4 && (norm("text_embedding") - 1.0).abs() < 1e-4
    );
    assert!(v["cosine"].as_f64().unwrap().abs() <= 1.0 + 1e-5);
}

#[test]
fn embed_bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (m, img) = (clip_dir(dir.path()), png(dir.path()));
    let (m, img) = (m.to_str().unwrap(), img.to_str().unwrap());
    // not an image
    let fake = dir.path().join("fake.jpg");
    std::fs::write(&fake, b"hello").unwrap();
    assert_clean_failure(
        &groundkit(&[
            "embed",
            "--model",
            m,
            "--image",
            fake.to_str().unwrap(),
            "--text",
            "x",
        ]),
        "fake.jpg",
    );
    // empty text
    assert_clean_failure(
        &groundkit(&["embed", "--model", m, "--image", img, "--text", "  "]),
        "empty",
    );
    // missing folder
    assert_clean_failure(
        &groundkit(&[
            "embed",
            "--model",
            "/nonexistent/clip",
            "--image",
            img,
            "--text",
            "x",
        ]),
        "/nonexistent/clip",
    );
    // weights that do not fit the config: name the tensor
    let cfg = std::path::Path::new(m).join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["projection_dim"] = 16.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    assert_clean_failure(
        &groundkit(&["embed", "--model", m, "--image", img, "--text", "x"]),
        "visual_projection",
    );
    // a truncated weight file
    let w = std::path::Path::new(m).join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(
        &groundkit(&["embed", "--model", m, "--image", img, "--text", "x"]),
        "model.safetensors",
    );
}

#[test]
fn synth_train_eval_predict_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let o = groundkit(&["synth", "--out", data.to_str().unwrap(), "--preset", "tiny"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(data.join("train.jsonl").is_file() && data.join("meta.json").is_file());
    // a config file written by hand from the tiny model
    let cfg = dir.path().join("cfg.toml");
    let run = dir.path().join("run");
    let mut rc = gk_train::train::RunConfig::synth(&data, 1);
    rc.model = gk_models::grounder::GrounderConfig::tiny();
    rc.loss.words = 0.0; // the tiny model has no word head
    rc.model.image_size = 64;
    rc.model.max_text_len = 16;
    if let gk_models::grounder::VisualConfig::ClipVit(v) = &mut rc.model.visual {
        v.patch_size = 16;
        v.image_size = 64;
    }
    rc.optim.batch_size = 8;
    std::fs::write(&cfg, toml::to_string(&rc).unwrap()).unwrap();
    let o = groundkit(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run.join("best.safetensors").is_file());
    // a second train into the same folder is refused, resume of a finished run is a no-op
    assert_clean_failure(
        &groundkit(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ]),
        "--resume",
    );
    assert!(groundkit(&["train", "--resume", run.to_str().unwrap()])
        .status
        .success());
    let o = groundkit(&["eval", "--run", run.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eval_json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(eval_json["val"]["all"]["n"].as_u64().unwrap() > 0 && eval_json.get("testB").is_some());
    let img = data
        .join("images/val")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let pic = dir.path().join("p.png");
    let o = groundkit(&[
        "predict",
        "--run",
        run.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--expr",
        "the red circle",
        "--out",
        pic.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bbox_xyxy"].as_array().unwrap().len(), 4);
    assert!(pic.is_file());
    // bad input to predict and eval
    assert_clean_failure(
        &groundkit(&[
            "predict",
            "--run",
            run.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--expr",
            "",
        ]),
        "empty",
    );
    assert_clean_failure(
        &groundkit(&["eval", "--run", dir.path().to_str().unwrap()]),
        "config.toml",
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\":1}\n").unwrap();
    assert_clean_failure(
        &groundkit(&[
            "eval",
            "--run",
            run.to_str().unwrap(),
            "--data",
            bad.to_str().unwrap(),
        ]),
        "bad.jsonl:1",
    );
    published_split_convert_stats_eval(dir.path(), &run);
    batch_predict_matches_eval_and_resumes(dir.path(), &run, &data, &eval_json);
    serve_answers_and_survives_bad_requests(&run, &img);
}

/// `predict --input` over the val set: the accuracy `eval` gave (`eval_json`), a bad row
/// counted and written, and a run cut mid-line continues to the same file, no line twice.
fn batch_predict_matches_eval_and_resumes(
    dir: &Path,
    run: &Path,
    data: &Path,
    eval_json: &serde_json::Value,
) {
    let input = dir.join("queries.jsonl");
    let mut text = std::fs::read_to_string(data.join("val.jsonl")).unwrap();
    let n = text.lines().count();
    text += "{\"id\": \"gone\", \"image\": \"images/val/missing.png\", \"expr\": \"x\"}\n";
    std::fs::write(&input, &text).unwrap();
    let out = dir.join("pred.jsonl");
    let predict = |batch: &str| {
        let o = groundkit(&[
            "predict",
            "--run",
            run.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--images",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch",
            batch,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let s = predict("8");
    assert_eq!(
        (s["predicted"].as_u64(), s["bad"].as_u64()),
        (Some(n as u64), Some(1))
    );
    assert_eq!(s["scored"].as_u64(), Some(n as u64));
    let acc = s["acc50"].as_f64().unwrap();
    let want = eval_json["val"]["all"]["acc50"].as_f64().unwrap();
    assert!((acc - want).abs() < 1e-9, "predict {acc} vs eval {want}");
    assert!(
        s["bad_examples"][0]
            .as_str()
            .unwrap()
            .contains("missing.png"),
        "{s}"
    );
    let full = std::fs::read_to_string(&out).unwrap();
    assert_eq!(full.lines().count(), n + 1);
    // an interrupted run: a third of the lines and half of the next
    let cut = full.lines().take(n / 3).map(|l| l.len() + 1).sum::<usize>() + 20;
    std::fs::write(&out, &full[..cut]).unwrap();
    let s = predict("3");
    assert_eq!(s["already_done"].as_u64(), Some((n / 3) as u64));
    let resumed = std::fs::read_to_string(&out).unwrap();
    let ids = |t: &str| {
        t.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&resumed),
        ids(&full),
        "same rows, same order, none twice"
    );
    assert_eq!(s["acc50"].as_f64(), Some(acc));
}

/// One raw HTTP/1.1 request (`head` without the blank line) -> (status, body text). Write
/// errors are ignored: a server may answer an oversize request before reading its body.
fn http(addr: &str, head: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let _ = s
        .write_all(format!("{head}\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .and_then(|()| s.write_all(body));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// `groundkit serve` on the trained run: a good request, then bad ones (each a clear 4xx),
/// then the good one again: same answer, the server kept serving.
fn serve_answers_and_survives_bad_requests(run: &Path, img: &Path) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_groundkit"))
        .args([
            "serve",
            "--run",
            run.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .args(["--max-body-mb", "1", "--max-expr-chars", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_string();
    let png = std::fs::read(img).unwrap();
    let (w, h) = image::image_dimensions(img).unwrap();
    let post = |query: &str, body: &[u8]| {
        http(
            &addr,
            &format!(
                "POST /v1/ground{query} HTTP/1.1\r\nContent-Length: {}",
                body.len()
            ),
            body,
        )
    };
    let json = |b: &str| -> serde_json::Value {
        serde_json::from_str(b.trim()).unwrap_or_else(|e| panic!("{e}: {b:?}"))
    };
    let good = || {
        let (status, body) = post("?expression=the%20red%20circle", &png);
        assert_eq!(status, 200, "{body}");
        let v = json(&body);
        let b: Vec<f64> = serde_json::from_value(v["results"][0]["bbox_xyxy"].clone()).unwrap();
        assert!(
            b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= w as f64 && b[3] <= h as f64,
            "{v}"
        );
        assert_eq!(v["image_size"], serde_json::json!([w, h]));
        b
    };
    let first = good();
    for (query, body, status, needle) in [
        ("", &png[..], 400, "expression"),
        ("?expression=%20%20", &png[..], 400, "empty"),
        (
            &*format!("?expression={}", "a".repeat(101)),
            &png[..],
            400,
            "has 101 characters",
        ),
        (
            "?expression=the%20red%20circle",
            &b"not an image"[..],
            400,
            "decode",
        ),
        (
            "?expression=the%20red%20circle",
            &b""[..],
            400,
            "empty image",
        ),
    ] {
        let (got, text) = post(query, body);
        assert_eq!(got, status, "{query}: {text}");
        let err = json(&text)["error"].as_str().unwrap().to_string();
        assert!(err.contains(needle), "{query}: {err}");
    }
    // a body declared over the limit (1 MiB) is refused from its header, before it is read
    // (none is sent: unread bytes would make the server's close a reset that eats the reply)
    let (got, text) = http(
        &addr,
        &format!(
            "POST /v1/ground?expression=x HTTP/1.1\r\nContent-Length: {}",
            2 << 20
        ),
        b"",
    );
    assert_eq!(got, 413, "{text}");
    assert!(
        json(&text)["error"].as_str().unwrap().contains("1 MiB"),
        "{text}"
    );
    let (got, text) = http(&addr, "GET /healthz HTTP/1.1", b"");
    assert_eq!((got, text.trim()), (200, "ok"));
    let (got, text) = http(&addr, "GET / HTTP/1.1", b"");
    assert!(got == 200 && text.contains("/v1/ground"), "{got}");
    assert_eq!(good(), first, "the same request after the bad ones");
    // SIGTERM with a request in flight (half its body sent): it is answered, then the
    // server exits cleanly
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let half = png.len() / 2;
    s.write_all(
        format!(
            "POST /v1/ground?expression=the%20red%20circle HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            png.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&png[..half]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    s.write_all(&png[half..]).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let v = json(out.split_once("\r\n\r\n").unwrap().1);
    let b: Vec<f64> = serde_json::from_value(v["results"][0]["bbox_xyxy"].clone()).unwrap();
    assert_eq!(b, first, "the request in flight at SIGTERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

fn split_fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../gk-data/tests/fixtures/splits")
        .join(p)
}

/// A TransVG RefCOCO split file, converted with its images in TransVG's `ln_data` layout,
/// counted, and evaluated with TransVG's integer boxes.
fn published_split_convert_stats_eval(dir: &Path, run: &Path) {
    let splits = split_fixture("");
    let ln_data = dir.join("ln_data");
    let coco = ln_data.join("other/images/mscoco/images/train2014");
    std::fs::create_dir_all(&coco).unwrap();
    let out = dir.join("conv/unc_val.jsonl");
    let convert = |extra: &[&str]| {
        let mut args = vec![
            "convert",
            "--from",
            "transvg",
            "--dataset",
            "unc",
            "--split",
            "val",
            "--input",
            splits.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--images",
            ln_data.to_str().unwrap(),
            "--check-images",
        ];
        args.extend_from_slice(extra);
        groundkit(&args)
    };
    // No images yet: a clear error that names the missing files.
    assert_clean_failure(&convert(&[]), "images missing under");
    for id in [42, 839, 123456, 581857] {
        image::RgbImage::from_fn(640, 480, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, 60])
        })
        .save(coco.join(format!("COCO_train2014_{id:012}.jpg")))
        .unwrap();
    }
    let o = convert(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("conv/unc_val.meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["rows"], 6);
    assert_eq!(meta["sources"][0]["sha256"].as_str().unwrap().len(), 64);
    let o = groundkit(&["stats", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("10834") && text.contains("expression length"),
        "{text}"
    );
    let o = groundkit(&[
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--data",
        out.to_str().unwrap(),
        "--images",
        ln_data.to_str().unwrap(),
        "--transvg-int-boxes",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["unc_val"]["all"]["n"], 6, "{v}");
    // Hostile split files fail cleanly, naming the file and what is wrong.
    let bad = |file: &str| {
        let p = split_fixture(&format!("hostile/{file}"));
        groundkit(&[
            "convert",
            "--from",
            "transvg",
            "--dataset",
            "unc",
            "--split",
            "val",
            "--input",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    assert_clean_failure(&bad("evil_global.pth"), "posix.system");
    assert_clean_failure(&bad("truncated.pth"), "truncated.pth");
    assert_clean_failure(&bad("negative_box.pth"), "row 2");
}

/// The distillation ablation end to end at toy size: a teacher pretrained on the tiny
/// benchmark, baseline, EpmVG and DUET for one seed, a table and a chart; unknown variants
/// are refused before any training. Then QRNet's ablation recipe on the same data.
#[test]
fn pretrain_teacher_and_ablate_distill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let o = groundkit(&["synth", "--out", data.to_str().unwrap(), "--preset", "tiny"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let teacher = dir.path().join("teacher");
    let o = groundkit(&[
        "pretrain-teacher",
        "--data",
        data.to_str().unwrap(),
        "--out",
        teacher.to_str().unwrap(),
        "--epochs",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("i2t R@1") && text.contains("object crops"),
        "{text}"
    );
    // `ablate` at toy size: one seed, full data, one epoch
    let ablate = |recipe: &str, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "ablate",
            "--recipe",
            recipe,
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--seeds",
            "0",
            "--fractions",
            "1.0",
            "--epochs",
            "1",
        ];
        args.extend_from_slice(extra);
        groundkit(&args)
    };
    let out = dir.path().join("ablate");
    let teacher_arg = teacher.to_str().unwrap();
    let args = |variants: &str| {
        ablate(
            "distill",
            &out,
            &["--teacher", teacher_arg, "--variants", variants],
        )
    };
    assert_clean_failure(&args("baseline,nonsense"), "unknown variant");
    let o = args("baseline,epmvg,duet");
    assert!(o.status.success(), "{}", stderr(&o));
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        table.contains("| 1 | baseline |")
            && table.contains("| 1 | epmvg |")
            && table.contains("| 1 | duet |"),
        "{table}"
    );
    assert!(out.join("ablation.png").is_file() && out.join("results.json").is_file());

    let qout = dir.path().join("ablate_qrnet");
    let qrnet = |extra: &[&str]| ablate("qrnet", &qout, extra);
    assert_clean_failure(
        &qrnet(&["--variants", "qrnet,duet"]),
        "unknown variant duet",
    );
    let o = qrnet(&["--variants", "qrnet-no-neck"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = std::fs::read_to_string(qout.join("results.md")).unwrap();
    assert!(table.contains("| 1 | qrnet-no-neck |"), "{table}");
    let cfg =
        std::fs::read_to_string(qout.join("runs/f1/qrnet-no-neck/seed0/config.toml")).unwrap();
    assert!(
        cfg.contains("kind = \"qr_net\"") && cfg.contains("neck = false"),
        "{cfg}"
    );
}

/// Weakly supervised CKD through the binary: detector, training without boxes, evaluation
/// with phrase recalls, prediction; bad inputs are named.
#[test]
fn weakly_supervised_ckd_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let o = groundkit(&["synth", "--out", data.to_str().unwrap(), "--preset", "tiny"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let det = dir.path().join("det");
    let o = groundkit(&[
        "train-detector",
        "--data",
        data.to_str().unwrap(),
        "--out",
        det.to_str().unwrap(),
        "--epochs",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("val accuracy"));
    // a detector needs labels.json
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_failure(
        &groundkit(&[
            "train-detector",
            "--data",
            empty.to_str().unwrap(),
            "--out",
            dir.path().join("d2").to_str().unwrap(),
        ]),
        "labels.json",
    );

    let mut rc = gk_train::ckd::CkdRunConfig::synth(&data, 1);
    rc.model = gk_models::ckd::CkdModelConfig {
        visual: gk_models::grounder::VisualConfig::ConvNet(gk_models::convnet::ConvNetConfig {
            image_size: 64,
            ..gk_models::convnet::ConvNetConfig::tiny()
        }),
        image_size: 64,
        ..gk_models::ckd::CkdModelConfig::tiny()
    };
    rc.optim.batch_size = 8;
    rc.optim.augment.side = 64;
    rc.ckd.proposals.max = 12;
    rc.ckd.detector = Some(dir.path().join("missing"));
    let cfg = dir.path().join("ckd.toml");
    std::fs::write(&cfg, toml::to_string(&rc).unwrap()).unwrap();
    let run = dir.path().join("run");
    let train = |cfg: &Path| {
        groundkit(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ])
    };
    assert_clean_failure(&train(&cfg), "detector.json");
    rc.ckd.detector = Some(det.clone());
    std::fs::write(&cfg, toml::to_string(&rc).unwrap()).unwrap();
    std::fs::remove_dir_all(&run).ok();
    let o = train(&cfg);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("phrase R@1"), "{}", stderr(&o));
    let o = groundkit(&["eval", "--run", run.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r1 = v["val"]["phrases"]["r1"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&r1) && v.get("heldout").is_some());
    let img = data.join("images/val/000000.png");
    let pic = dir.path().join("ckd.png");
    let o = groundkit(&[
        "predict",
        "--run",
        run.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--expr",
        "the small red circle left of the star",
        "--out",
        pic.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["phrase"], "the small red circle");
    assert!(pic.is_file());
    assert_clean_failure(
        &groundkit(&[
            "ablate",
            "--recipe",
            "ckd",
            "--data",
            data.to_str().unwrap(),
            "--out",
            dir.path().join("abl").to_str().unwrap(),
            "--variants",
            "nce+distill",
        ]),
        "--detector",
    );
}

/// Flickr30k Entities' own layout converts to one record per caption with its phrases.
#[test]
fn flickr30k_entities_converts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("flickr30k_entities");
    std::fs::create_dir_all(d.join("Sentences")).unwrap();
    std::fs::create_dir_all(d.join("Annotations")).unwrap();
    std::fs::write(d.join("val.txt"), "42\n").unwrap();
    std::fs::write(
        d.join("Sentences/42.txt"),
        "[/EN#1/people A man] holds [/EN#2/animals a dog] .\n[/EN#2/animals The dog] sleeps .\n",
    )
    .unwrap();
    std::fs::write(
        d.join("Annotations/42.xml"),
        "<annotation><size><width>60</width><height>40</height><depth>3</depth></size>\
         <object><name>1</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>\
         <object><name>2</name><bndbox><xmin>31</xmin><ymin>20</ymin><xmax>60</xmax><ymax>40</ymax></bndbox></object>\
         </annotation>",
    )
    .unwrap();
    let out = dir.path().join("val.jsonl");
    let o = groundkit(&[
        "convert",
        "--from",
        "entities",
        "--dataset",
        "flickr",
        "--split",
        "val",
        "--input",
        d.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["expr"], "A man holds a dog .");
    assert_eq!(
        rows[0]["extra"]["phrases"],
        serde_json::json!(["A man", "a dog"])
    );
    assert_eq!(
        rows[1]["bbox_xyxy"],
        serde_json::json!([30.0, 19.0, 59.0, 39.0])
    );
    assert!(dir.path().join("val.meta.json").is_file());
    assert_clean_failure(
        &groundkit(&[
            "convert",
            "--from",
            "entities",
            "--dataset",
            "unc",
            "--split",
            "val",
            "--input",
            d.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]),
        "--dataset flickr",
    );
}

/// ReferItGame's text_objseg JSON layout converts crop by crop, query by query; a missing
/// image is caught by --check-images.
#[test]
fn referit_text_objseg_layout_converts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("referit_query_val.json"),
        r#"{"42_2.png": ["dog on the right", "brown dog"], "42_1.png": ["man"]}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("referit_bbox.json"),
        r#"{"42_1.png": [1, 1, 30, 39], "42_2.png": [31, 20, 59, 39]}"#,
    )
    .unwrap();
    let images = dir.path().join("ln_data");
    std::fs::create_dir_all(images.join("referit/images")).unwrap();
    let convert = |input: &Path, out: &Path| {
        groundkit(&[
            "convert",
            "--from",
            "text-objseg",
            "--dataset",
            "referit",
            "--split",
            "val",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--check-images",
        ])
    };
    let out = dir.path().join("referit_val.jsonl");
    assert_clean_failure(&convert(&d, &out), "42.jpg");
    image::RgbImage::new(60, 40)
        .save(images.join("referit/images/42.jpg"))
        .unwrap();
    let o = convert(&d, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exprs: Vec<&str> = rows.iter().map(|r| r["expr"].as_str().unwrap()).collect();
    assert_eq!(exprs, ["dog on the right", "brown dog", "man"]);
    assert_eq!(
        rows[2]["bbox_xyxy"],
        serde_json::json!([1.0, 1.0, 30.0, 39.0])
    );
    assert_eq!(rows[0]["image"], "referit/images/42.jpg");
}

/// `import transvg` then `predict` on the imported run: TransVG's box for the case (from
/// its own code, `tests/fixtures/transvg/cases.json`), wrong files refused by name.
#[test]
fn import_transvg_then_predict() {
    let dir = tempfile::tempdir().unwrap();
    let tv = |p: &str| fixture(&format!("transvg/{p}"));
    let run = dir.path().join("tv");
    let (ckpt, vocab) = (tv("r101_tiny_legacy.pth"), tv("vocab.txt"));
    let import = |ckpt: &Path, out: &Path| {
        let (c, v, o) = (
            ckpt.to_str().unwrap(),
            vocab.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        groundkit(&[
            "import",
            "transvg",
            "--checkpoint",
            c,
            "--vocab",
            v,
            "--out",
            o,
        ])
    };
    let o = import(&ckpt, &run);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("resnet101") && err.contains("Legacy") && err.contains("max_query_len 40"),
        "{err}"
    );
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tv("cases.json")).unwrap()).unwrap();
    let case = &cases["models"]["r101_tiny_legacy.pth"]["cases"][1];
    let image = tv(&format!("images/{}", case["image"].as_str().unwrap()));
    let picture = dir.path().join("p.png");
    predict_matches(&run, &image, case, &picture);
    // fine-tuning starts from the imported weights (one step on the embedded benchmark)
    let o = fine_tune_one_step(dir.path(), &run);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("loaded 605 tensors"), "{}", stderr(&o));
    // a second import into the same folder, a DETR file, a missing file
    let o = import(&ckpt, &run);
    assert_clean_failure(&o, "tv");
    let detr = tv("detr_r50_tiny.pth");
    let o = import(&detr, &dir.path().join("d"));
    assert_clean_failure(&o, "DETR detection checkpoint");
    let o = import(Path::new("nope.pth"), &dir.path().join("n"));
    assert_clean_failure(&o, "nope.pth");
}

/// `predict` on a reference case: the box within 0.5 px of its `bbox_xyxy_clipped`, and
/// the picture written.
fn predict_matches(run: &Path, image: &Path, case: &serde_json::Value, picture: &Path) {
    let o = groundkit(&[
        "predict",
        "--run",
        run.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--expr",
        case["expr"].as_str().unwrap(),
        "--out",
        picture.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (a, b) in got["bbox_xyxy"]
        .as_array()
        .unwrap()
        .iter()
        .zip(case["bbox_xyxy_clipped"].as_array().unwrap())
    {
        assert!(
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 0.5,
            "{got} vs {case}"
        );
    }
    assert!(picture.is_file());
}

/// One fine-tuning step of an imported run on the embedded benchmark (`train
/// --init-from`): the run's own config with the benchmark's data.
fn fine_tune_one_step(dir: &Path, run: &Path) -> Output {
    let data = dir.join("data");
    assert!(
        groundkit(&["synth", "--out", data.to_str().unwrap(), "--preset", "tiny"])
            .status
            .success()
    );
    let mut rc: gk_train::train::RunConfig =
        toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    rc.data.train = data.join("train.jsonl");
    rc.data.val = data.join("val.jsonl");
    rc.data.test = Vec::new();
    rc.optim.batch_size = 2;
    rc.optim.workers = 1;
    let cfg = dir.join("ft.toml");
    std::fs::write(&cfg, toml::to_string(&rc).unwrap()).unwrap();
    groundkit(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        dir.join("ft").to_str().unwrap(),
        "--init-from",
        run.to_str().unwrap(),
        "--stop-after",
        "1",
    ])
}

/// `import hivg` in HiVG's batch-mixing mode, then `eval` over the reference's batch in
/// its order (the reference boxes as ground truth: every IoU ~1), `predict` of one case
/// alone, and `import clip-vg` of the CLIP-VG file; a HiVG file that lost its bridge
/// weights fails cleanly.
#[test]
fn import_hivg_then_eval_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let hv = |p: &str| fixture(&format!("hivg_release/{p}"));
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hv("cases.json")).unwrap()).unwrap();
    let model = &cases["models"]["hivg_b_tiny_uncplus.pth"];
    let run = dir.path().join("hivg");
    let import = |family: &str, file: &Path, out: &Path, extra: &[&str]| {
        let (c, t, o) = (
            file.to_str().unwrap(),
            hv("tokenizer.json"),
            out.to_str().unwrap(),
        );
        let mut args = vec![
            "import",
            family,
            "--checkpoint",
            c,
            "--tokenizer",
            t.to_str().unwrap(),
            "--out",
            o,
            "--heads",
            "2,2",
        ];
        args.extend_from_slice(extra);
        groundkit(&args)
    };
    let o = import(
        "hivg",
        &hv("hivg_b_tiny_uncplus.pth"),
        &run,
        &["--bridge-mode", "batched"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("bridges in layers [0, 3, 7, 11] reading text layers [6, 12]")
            && err.contains("112 LoRA pairs merged")
            && err.contains("Batched"),
        "{err}"
    );
    // the batch of the reference, in its order, as a set whose boxes are HiVG's answers
    let all = model["cases"].as_array().unwrap();
    let batched = &model["batched"];
    let mut rows = String::new();
    for (k, i) in batched["order"].as_array().unwrap().iter().enumerate() {
        let case = &all[i.as_u64().unwrap() as usize];
        let name = case["image"].as_str().unwrap();
        let image = hv(cases["images"][name]["path"].as_str().unwrap());
        let row = serde_json::json!({
            "id": format!("t/{k}"), "dataset": "t", "split": "val",
            "image": image.canonicalize().unwrap().to_str().unwrap(),
            "bbox_xyxy": batched["bbox_xyxy_clipped"][k], "expr": case["expr"],
        });
        rows += &format!("{row}\n");
    }
    let set = dir.path().join("val.jsonl");
    std::fs::write(&set, rows).unwrap();
    let eval = |batch: &str| {
        groundkit(&[
            "eval",
            "--run",
            run.to_str().unwrap(),
            "--data",
            set.to_str().unwrap(),
            "--images",
            "/",
            "--batch",
            batch,
            "--json",
        ])
    };
    let o = eval("5");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("batch-mixing bridges") && stderr(&o).contains("batches of 5"),
        "{}",
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let miou = v["val"]["all"]["miou"].as_f64().unwrap(); // percent
    assert!(miou > 99.9, "batched eval at the reference's batch: {v}");
    // one query alone is another batch: HiVG's own box at batch 1
    let one = eval("1");
    let v1: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert!(v1["val"]["all"]["miou"].as_f64().unwrap() < 99.0, "{v1}");
    let case = &all[0];
    let name = case["image"].as_str().unwrap();
    let image = hv(cases["images"][name]["path"].as_str().unwrap());
    predict_matches(&run, &image, case, &dir.path().join("p.png"));
    // fine-tuning starts from the imported weights (one step on the embedded benchmark)
    let o = fine_tune_one_step(dir.path(), &run);
    assert!(o.status.success(), "{}", stderr(&o));
    let n = std::fs::read_to_string(run.join("import.json")).unwrap();
    let n: serde_json::Value = serde_json::from_str(&n).unwrap();
    let loaded = format!("loaded {} tensors", n["tensors"]);
    assert!(stderr(&o).contains(&loaded), "{}", stderr(&o));
    let cv = dir.path().join("clipvg");
    let o = import(
        "clip-vg",
        &fixture("clipvg_release/clipvg_b_tiny.pth"),
        &cv,
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("CLIP-VG (Zip container)"),
        "{}",
        stderr(&o)
    );
    let o = import(
        "hivg",
        &hv("hivg_b_tiny_missing_bridge.pth"),
        &dir.path().join("bad"),
        &[],
    );
    assert_clean_failure(&o, "bridges' trained attention weights are missing");
}

/// `fuzz`: a short run over two parsers from the repository's fixtures; an unknown parser
/// name is a clean error.
#[test]
fn fuzz_runs_and_names_unknown_parsers() {
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let save = dir.path().join("failures");
    let o = groundkit(&[
        "fuzz",
        "--inputs",
        "300",
        "--targets",
        "config,pickle",
        "--root",
        root.to_str().unwrap(),
        "--save",
        save.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["inputs"], 300);
        assert!(l["failures"].as_array().unwrap().is_empty(), "{l}");
    }
    let o = groundkit(&[
        "fuzz",
        "--targets",
        "nope",
        "--root",
        root.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "no parser \"nope\"");
}
