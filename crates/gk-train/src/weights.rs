//! Weight files: loading safetensors into a model's `VarMap` by name prefix (pretrained
//! backbones into a fresh grounder), with an exact report of what did not fit, and
//! atomic saving.

use crate::error::{io_err, Result, TrainError};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Reads every tensor of a safetensors file; a file that is not safetensors is an error
/// naming it.
pub fn read_safetensors(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    candle_core::safetensors::load_buffer(&bytes, dev).map_err(|e| TrainError::Format {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file: {e}"),
    })
}

/// What a load did, name by name (model-side names).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Model parameters under a mapped prefix that the file did not have.
    pub missing: Vec<String>,
    /// File tensors under a mapped prefix that the model does not have (file-side names).
    pub unexpected: Vec<String>,
    /// `(name, model shape, file shape)`.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "loaded {} tensors", self.loaded.len())?;
        let list =
            |f: &mut std::fmt::Formatter<'_>, what: &str, v: &[String]| -> std::fmt::Result {
                // the first 12 names, then a count (a new adapter can miss hundreds)
                match v.len() {
                    0 => {}
                    n if n <= 12 => writeln!(f, "{n} {what}: {}", v.join(", "))?,
                    n => writeln!(
                        f,
                        "{n} {what}: {}, ... and {} more",
                        v[..12].join(", "),
                        n - 12
                    )?,
                }
                Ok(())
            };
        list(f, "missing from the file", &self.missing)?;
        list(f, "in the file but not in the model", &self.unexpected)?;
        for (n, m, w) in &self.mismatched {
            writeln!(f, "shape mismatch {n}: model {m:?}, file {w:?}")?;
        }
        Ok(())
    }
}

/// Buffers some exporters include that are not parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids") || name.ends_with("num_batches_tracked")
}

/// Loads `path` into `map`: a file tensor `src + rest` goes to model parameter `dst + rest`
/// for each `(src, dst)` in `prefixes` (`("", "")` maps everything as is).
///
/// With `strict`, anything missing, unexpected or of the wrong shape is an error that names
/// them (the first 12 of each kind, then a count) and nothing is changed; otherwise those
/// are skipped and reported.
pub fn load_prefixed(
    map: &VarMap,
    path: &Path,
    prefixes: &[(&str, &str)],
    strict: bool,
) -> Result<LoadReport> {
    let dev = map
        .data()
        .lock()
        .map_err(|_| TrainError::Config("poisoned var map".into()))?
        .values()
        .next()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let file = read_safetensors(path, &dev)?;
    load_tensors(map, &file, path, prefixes, strict)
}

/// [`load_prefixed`] from tensors already read (`path` names their file in errors).
pub fn load_tensors(
    map: &VarMap,
    file: &HashMap<String, Tensor>,
    path: &Path,
    prefixes: &[(&str, &str)],
    strict: bool,
) -> Result<LoadReport> {
    let vars = map
        .data()
        .lock()
        .map_err(|_| TrainError::Config("poisoned var map".into()))?;
    let mut report = LoadReport::default();
    let mut assign: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut names: Vec<&String> = file.keys().collect();
    names.sort();
    for name in names {
        let Some((src, dst)) = prefixes.iter().find(|(s, _)| name.starts_with(s)) else {
            continue;
        };
        if is_buffer(name) {
            continue;
        }
        let target = format!("{dst}{}", &name[src.len()..]);
        let t = &file[name];
        match vars.get(&target) {
            None => report.unexpected.push(name.clone()),
            Some(v) if v.dims() != t.dims() => {
                report
                    .mismatched
                    .push((target, v.dims().to_vec(), t.dims().to_vec()))
            }
            Some(_) => {
                assign.insert(target, t.clone());
            }
        }
    }
    let mut model_names: Vec<&String> = vars.keys().collect();
    model_names.sort();
    for name in model_names {
        let under = prefixes.iter().any(|(_, d)| name.starts_with(d));
        if under && !assign.contains_key(name) && !report.mismatched.iter().any(|m| &m.0 == name) {
            report.missing.push(name.clone());
        }
    }
    if strict && !report.is_clean() {
        return Err(TrainError::Weights {
            path: path.to_path_buf(),
            report: report.to_string(),
        });
    }
    for (name, t) in assign {
        let var = &vars[&name];
        var.set(&t.to_dtype(var.dtype())?)?;
        report.loaded.push(name);
    }
    Ok(report)
}

/// Checks that `file` holds exactly the parameters of `map` (buffers such as
/// `position_ids` aside): after a model was built from the file's tensors
/// ([`crate::init::var_builder_from`]), a parameter it lacked was drawn and one it has
/// but the model never asked for was ignored; both are errors naming them.
pub fn check_exact(map: &VarMap, file: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let vars = map
        .data()
        .lock()
        .map_err(|_| TrainError::Config("poisoned var map".into()))?;
    let mut report = LoadReport::default();
    for name in vars.keys() {
        if !file.contains_key(name) {
            report.missing.push(name.clone());
        }
    }
    for name in file.keys() {
        if !is_buffer(name) && !vars.contains_key(name) {
            report.unexpected.push(name.clone());
        }
    }
    if report.is_clean() {
        return Ok(());
    }
    report.missing.sort();
    report.unexpected.sort();
    Err(TrainError::Weights {
        path: path.to_path_buf(),
        report: report.to_string(),
    })
}

/// Writes all parameters to `path` atomically (temp file in the same folder + rename).
pub fn save_atomic(map: &VarMap, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = map
        .data()
        .lock()
        .map_err(|_| TrainError::Config("parameter map lock poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors_atomic(&tensors, path)
}

/// Writes named tensors to `path` atomically (temp file in the same folder + rename),
/// readable by everyone like any other run file (the safetensors writer creates its file
/// owner-only).
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| TrainError::Format {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes bytes atomically (temp file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::{Init, VarBuilder};

    fn model(map: &VarMap) -> candle_core::Result<()> {
        let vb = VarBuilder::from_varmap(map, DType::F32, &Device::Cpu);
        vb.get_with_hints((2, 3), "backbone.a", Init::Const(0.0))?;
        vb.get_with_hints(4, "backbone.b", Init::Const(0.0))?;
        vb.get_with_hints(4, "head.w", Init::Const(7.0))?;
        Ok(())
    }

    fn write(path: &Path, tensors: &[(&str, Tensor)]) {
        let m: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&m, path).unwrap();
    }

    #[test]
    fn prefix_load_maps_names_and_reports_misfits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let dev = Device::Cpu;
        write(
            &p,
            &[
                (
                    "vision_model.a",
                    Tensor::ones((2, 3), DType::F32, &dev).unwrap(),
                ),
                ("vision_model.b", Tensor::ones(5, DType::F32, &dev).unwrap()),
                (
                    "vision_model.extra",
                    Tensor::ones(1, DType::F32, &dev).unwrap(),
                ),
                (
                    "vision_model.position_ids",
                    Tensor::ones(1, DType::F32, &dev).unwrap(),
                ),
                ("text_model.x", Tensor::ones(1, DType::F32, &dev).unwrap()),
            ],
        );
        let map = VarMap::new();
        model(&map).unwrap();
        let err = load_prefixed(&map, &p, &[("vision_model.", "backbone.")], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vision_model.extra") && err.contains("backbone.b") && err.contains("[4]"),
            "{err}"
        );
        // strict failure changed nothing
        let a = map.data().lock().unwrap()["backbone.a"]
            .as_tensor()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(a, 0.0);
        let r = load_prefixed(&map, &p, &[("vision_model.", "backbone.")], false).unwrap();
        assert_eq!(r.loaded, vec!["backbone.a"]);
        assert_eq!(r.unexpected, vec!["vision_model.extra"]);
        assert_eq!(r.mismatched.len(), 1);
        assert!(r.missing.is_empty(), "{r}");
        let a = map.data().lock().unwrap()["backbone.a"]
            .as_tensor()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(a, 6.0);
    }

    #[test]
    fn wrong_file_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk.safetensors");
        std::fs::write(&p, b"\x05\x00\x00\x00\x00\x00\x00\x00hello").unwrap();
        let map = VarMap::new();
        model(&map).unwrap();
        let e = load_prefixed(&map, &p, &[("", "")], true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("junk.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
    }

    #[test]
    fn atomic_save_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        let map = VarMap::new();
        model(&map).unwrap();
        save_atomic(&map, &p).unwrap();
        assert!(!dir.path().join("model.safetensors.tmp").exists());
        let map2 = VarMap::new();
        model(&map2).unwrap();
        map2.data().lock().unwrap()["head.w"]
            .set(&Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let r = load_prefixed(&map2, &p, &[("", "")], true).unwrap();
        assert_eq!(r.loaded.len(), 3);
        let w = map2.data().lock().unwrap()["head.w"]
            .as_tensor()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(w, 28.0);
    }
}
