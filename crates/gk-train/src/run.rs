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
//! leaves a half-written checkpoint.

use crate::error::{io_err, Result, TrainError};
use crate::weights;
use candle_nn::VarMap;
use serde::{de::DeserializeOwned, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

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
