//! Run directories: the unit of reproducibility.
//!
//! ```text
//! RUN_DIR/config.toml          the whole run config (model, data, training)
//! RUN_DIR/model.safetensors    last weights (parameter names = `vb.pp(...)` paths)
//! RUN_DIR/best.safetensors     best weights by the validation metric
//! RUN_DIR/trainer_state.json   step, optimiser moments file, RNG state, best metric
//! RUN_DIR/metrics.jsonl        one JSON object per log/eval event
//! ```
//! Every file is written atomically (temp file + rename), so an interrupted run never
//! leaves a half-written file; and a checkpoint (`model.safetensors`, `optim.safetensors`,
//! `trainer_state.json`) is committed as one generation ([`RunDir::save_checkpoint`]):
//! the new weight files are written beside the old ones (`*.next.safetensors`), a
//! `checkpoint.pending` marker names the step, the old files become `*.prev.safetensors`
//! and the new ones take their names, and `trainer_state.json` is the commit point; a run
//! killed anywhere in between is rolled back or forward by
//! [`RunDir::recover_checkpoint`] before it resumes, so weights, moments and step always
//! agree. (Without `fsync`: a kill is survived, a power loss may not be.)

use crate::error::{io_err, Result, TrainError};
use crate::weights;
use candle_nn::VarMap;
use serde::{de::DeserializeOwned, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The weight files of a checkpoint generation, besides `trainer_state.json`.
pub const CHECKPOINT_FILES: [&str; 2] = ["model.safetensors", "optim.safetensors"];
const PENDING: &str = "checkpoint.pending";

/// `model.safetensors` -> `model.<tag>.safetensors`.
fn staged(name: &str, tag: &str) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) => format!("{stem}.{tag}.{ext}"),
        None => format!("{name}.{tag}"),
    }
}

/// Test support for the crash tests: with `GK_FAILPOINT=<stage>:<n>` set, the process
/// aborts (as if killed) at `stage` of its `n`-th checkpoint (stages `next`, `pending`,
/// `swap`, `swapped`, `commit`, in the order [`RunDir::save_checkpoint`] passes them).
fn failpoint(stage: &str) {
    static SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Ok(spec) = std::env::var("GK_FAILPOINT") else {
        return;
    };
    let Some((at, n)) = spec.split_once(':') else {
        return;
    };
    if stage == "next" {
        SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let count = SEEN.load(std::sync::atomic::Ordering::Relaxed);
    if at == stage && n.parse() == Ok(count) {
        eprintln!("GK_FAILPOINT: aborting at {stage} of checkpoint {count}");
        std::process::abort();
    }
}

#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates the folder (and parents) if needed.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(io_err(path))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing run; it must hold a `config.toml`.
    pub fn open(path: &Path) -> Result<Self> {
        let run = Self {
            path: path.to_path_buf(),
        };
        if !run.file("config.toml").is_file() {
            return Err(TrainError::Format {
                path: path.to_path_buf(),
                msg: "not a run directory (no config.toml)".into(),
            });
        }
        Ok(run)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn save_config<T: Serialize>(&self, cfg: &T) -> Result<()> {
        let text = toml::to_string_pretty(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
        weights::write_atomic(&self.file("config.toml"), text.as_bytes())
    }

    pub fn load_config<T: DeserializeOwned>(&self) -> Result<T> {
        let p = self.file("config.toml");
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        toml::from_str(&text).map_err(|e| TrainError::Format {
            path: p,
            msg: e.to_string(),
        })
    }

    pub fn save_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let text =
            serde_json::to_string_pretty(value).map_err(|e| TrainError::Config(e.to_string()))?;
        weights::write_atomic(&self.file(name), text.as_bytes())
    }

    pub fn load_json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let p = self.file(name);
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        serde_json::from_str(&text).map_err(|e| TrainError::Format {
            path: p,
            msg: e.to_string(),
        })
    }

    /// Saves all parameters as `name` (e.g. `model.safetensors`).
    pub fn save_weights(&self, map: &VarMap, name: &str) -> Result<()> {
        weights::save_atomic(map, &self.file(name))
    }

    /// Loads `name` into a model built from this run's config; strict.
    pub fn load_weights(&self, map: &VarMap, name: &str) -> Result<()> {
        weights::load_prefixed(map, &self.file(name), &[("", "")], true).map(|_| ())
    }

    /// Writes one checkpoint generation: every `(name, write)` file (`write` writes a
    /// complete file at the path it is given), then `trainer_state.json` from `state`, as
    /// one unit (module docs). `step` is the generation's step.
    pub fn save_checkpoint<T: Serialize>(
        &self,
        step: usize,
        files: &[(&str, &dyn Fn(&Path) -> Result<()>)],
        state: &T,
    ) -> Result<()> {
        for (name, write) in files {
            write(&self.file(&staged(name, "next")))?;
        }
        failpoint("next");
        weights::write_atomic(&self.file(PENDING), step.to_string().as_bytes())?;
        failpoint("pending");
        for (name, _) in files {
            let (cur, prev) = (self.file(name), self.file(&staged(name, "prev")));
            if cur.is_file() {
                std::fs::rename(&cur, &prev).map_err(io_err(&prev))?;
            }
            failpoint("swap");
            std::fs::rename(self.file(&staged(name, "next")), &cur).map_err(io_err(&cur))?;
        }
        failpoint("swapped");
        self.save_json("trainer_state.json", state)?;
        failpoint("commit");
        for (name, _) in files {
            let prev = self.file(&staged(name, "prev"));
            if prev.is_file() {
                std::fs::remove_file(&prev).map_err(io_err(&prev))?;
            }
        }
        std::fs::remove_file(self.file(PENDING)).map_err(io_err(&self.file(PENDING)))
    }

    /// Finishes or undoes a checkpoint that a killed run left half made: with
    /// `trainer_state.json` at the pending step the new files stay (the old ones go),
    /// otherwise the old files come back; stray `*.next` files go either way. A no-op on a
    /// clean run folder.
    pub fn recover_checkpoint(&self) -> Result<()> {
        for name in CHECKPOINT_FILES {
            let next = self.file(&staged(name, "next"));
            if next.is_file() {
                std::fs::remove_file(&next).map_err(io_err(&next))?;
            }
        }
        let pending = self.file(PENDING);
        let Ok(text) = std::fs::read_to_string(&pending) else {
            return Ok(());
        };
        let step: Option<usize> = text.trim().parse().ok();
        let committed = std::fs::read_to_string(self.file("trainer_state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .is_some_and(|s| Some(s as usize) == step);
        for name in CHECKPOINT_FILES {
            let prev = self.file(&staged(name, "prev"));
            if !prev.is_file() {
                continue;
            }
            if committed {
                std::fs::remove_file(&prev).map_err(io_err(&prev))?;
            } else {
                std::fs::rename(&prev, self.file(name)).map_err(io_err(&prev))?;
            }
        }
        std::fs::remove_file(&pending).map_err(io_err(&pending))
    }

    /// Appends one JSON object to `metrics.jsonl`.
    pub fn log_metrics(&self, value: &serde_json::Value) -> Result<()> {
        let p = self.file("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io_err(&p))?;
        writeln!(f, "{value}").map_err(io_err(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Cfg {
        name: String,
        lr: f64,
    }

    #[test]
    fn config_round_trips_and_open_needs_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r")).unwrap();
        assert!(RunDir::open(run.path()).is_err());
        let c = Cfg {
            name: "x".into(),
            lr: 1e-4,
        };
        run.save_config(&c).unwrap();
        let back: Cfg = RunDir::open(run.path()).unwrap().load_config().unwrap();
        assert_eq!(back, c);
        run.log_metrics(&serde_json::json!({"step": 1})).unwrap();
        run.log_metrics(&serde_json::json!({"step": 2})).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.file("metrics.jsonl"))
                .unwrap()
                .lines()
                .count(),
            2
        );
    }
}
