//! Crash-safe training: a short run killed at every stage of a checkpoint write
//! (`GK_FAILPOINT`, an abort as abrupt as SIGKILL) and by SIGKILL at arbitrary moments,
//! then resumed, ends with exactly the weights, optimiser moments and state of a run that
//! was never interrupted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn groundkit(args: &[&str], failpoint: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_groundkit"));
    c.args(args).env("RAYON_NUM_THREADS", "1");
    if let Some(f) = failpoint {
        c.env("GK_FAILPOINT", f);
    }
    c.output().expect("run groundkit")
}

/// A tiny model that checkpoints every 2 steps (15 steps in all: 3 epochs of 5).
fn config(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let o = groundkit(
        &["synth", "--out", data.to_str().unwrap(), "--preset", "tiny"],
        None,
    );
    assert!(o.status.success());
    let mut rc = gk_train::train::RunConfig::synth(&data, 3);
    rc.model = gk_models::grounder::GrounderConfig::tiny();
    rc.loss.words = 0.0;
    rc.model.image_size = 64;
    rc.model.max_text_len = 16;
    if let gk_models::grounder::VisualConfig::ClipVit(v) = &mut rc.model.visual {
        v.patch_size = 16;
        v.image_size = 64;
    }
    rc.data.test = Vec::new();
    rc.optim.batch_size = 8;
    rc.optim.eval_every = 2;
    rc.optim.workers = 1;
    rc.model.fusion.dropout = 0.1; // seeded dropout must replay too
    let cfg = dir.join("cfg.toml");
    std::fs::write(&cfg, toml::to_string(&rc).unwrap()).unwrap();
    cfg
}

/// Every tensor of the run's final weights and moments, and its step and best metric.
fn outcome(run: &Path) -> (Vec<(String, Vec<f32>)>, serde_json::Value) {
    let mut all = Vec::new();
    for f in ["model.safetensors", "optim.safetensors", "best.safetensors"] {
        let t =
            gk_train::weights::read_safetensors(&run.join(f), &candle_core::Device::Cpu).unwrap();
        let mut v: Vec<_> = t
            .into_iter()
            .map(|(k, t)| {
                (
                    format!("{f}:{k}"),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        all.extend(v);
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("trainer_state.json")).unwrap())
            .unwrap();
    let keep = serde_json::json!({
        "step": state["step"], "best_acc": state["best_acc"], "best_step": state["best_step"],
        "finished": state["finished"],
    });
    (all, keep)
}

fn start(cfg: &Path, run: &Path) -> Vec<String> {
    if run.join("config.toml").is_file() {
        vec!["train".into(), "--resume".into(), run.display().to_string()]
    } else {
        vec![
            "train".into(),
            "--config".into(),
            cfg.display().to_string(),
            "--out".into(),
            run.display().to_string(),
        ]
    }
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let whole = dir.path().join("whole");
    let args = start(&cfg, &whole);
    let o = groundkit(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = outcome(&whole);
    assert_eq!(
        (&want.1["step"], &want.1["finished"]),
        (&15.into(), &true.into())
    );

    // a kill inside the 2nd and the 5th checkpoint at every stage of its write
    for stage in ["next", "pending", "swap", "swapped", "commit"] {
        for n in ["2", "5"] {
            let run = dir.path().join(format!("fp-{stage}-{n}"));
            let args = start(&cfg, &run);
            let o = groundkit(
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                Some(&format!("{stage}:{n}")),
            );
            assert!(!o.status.success(), "{stage}:{n} did not abort");
            assert!(String::from_utf8_lossy(&o.stderr).contains("GK_FAILPOINT"));
            let args = start(&cfg, &run);
            let o = groundkit(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
            assert!(
                o.status.success(),
                "resume after {stage}:{n}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let got = outcome(&run);
            assert_eq!(got.1, want.1, "state after a kill at {stage}:{n}");
            assert!(
                got.0 == want.0,
                "weights after a kill at {stage}:{n} differ"
            );
            for leftover in [
                "checkpoint.pending",
                "model.prev.safetensors",
                "model.next.safetensors",
            ] {
                assert!(
                    !run.join(leftover).exists(),
                    "{leftover} left after {stage}:{n}"
                );
            }
        }
    }

    // SIGKILL at arbitrary moments (a fixed sequence of delays), resumed until done
    let run = dir.path().join("sigkill");
    let mut kills = 0;
    for delay_ms in [40u64, 90, 60, 150, 70, 200, 110, 130, 50, 170] {
        let args = start(&cfg, &run);
        let mut child = Command::new(env!("CARGO_BIN_EXE_groundkit"))
            .args(&args)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    let args = start(&cfg, &run);
    let o = groundkit(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = outcome(&run);
    assert_eq!(got.1, want.1, "state after {kills} SIGKILLs");
    assert!(got.0 == want.0, "weights after {kills} SIGKILLs differ");
    println!(
        "{kills} SIGKILLs and 10 failpoint aborts: every resumed run equals the uninterrupted one"
    );
}
