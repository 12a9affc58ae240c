//! Reading and writing safetensors checkpoints. Names in the files are the module paths the model
//! uses (the transformers names), so there is no renaming table. Only safetensors is ever read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::nn::{Init, ParamSource};

/// The single-file and sharded checkpoint names transformers writes.
pub const WEIGHTS_NAME: &str = "model.safetensors";
pub const WEIGHTS_INDEX_NAME: &str = "model.safetensors.index.json";

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found("weights file", path),
        _ => Error::io(format!("cannot open {}", path.display()), e),
    })?;
    // SAFETY: the map is read-only and lives as long as the reader; a file truncated underneath us by
    // another process is the one case mmap cannot guard against, as with any mmap-based loader.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(format!("cannot map {}", path.display()), e))
}

pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

pub fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(Error::invalid(format!(
                "cannot save tensors of kind {other:?} to safetensors"
            )))
        }
    })
}

/// One or more memory-mapped safetensors files, read tensor by tensor.
pub struct SafetensorsFiles {
    maps: Vec<(PathBuf, Mmap)>,
    /// Tensor name to index into `maps`.
    index: BTreeMap<String, usize>,
}

impl SafetensorsFiles {
    /// Opens the given files and indexes every tensor they hold.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let map = map_file(path)?;
            let names = SafeTensors::read_metadata(&map)
                .map_err(|e| {
                    Error::checkpoint(format!("{} is not a valid safetensors file: {e}", path.display()))
                })?
                .1
                .tensors()
                .into_keys()
                .collect::<Vec<_>>();
            for name in names {
                index.insert(name, i);
            }
            maps.push((path.clone(), map));
        }
        Ok(Self { maps, index })
    }

    /// Opens a checkpoint folder's weights: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open_folder(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS_NAME);
        if single.is_file() {
            return Self::open(&[single]);
        }
        let index_path = dir.join(WEIGHTS_INDEX_NAME);
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| Error::io(format!("cannot read {}", index_path.display()), e))?;
            let doc: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(format!("{} is not valid JSON: {e}", index_path.display())))?;
            let map = doc.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                Error::checkpoint(format!("{} has no `weight_map` object", index_path.display()))
            })?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open(&paths);
        }
        for legacy in [
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "model.bin",
            "tf_model.h5",
        ] {
            if dir.join(legacy).exists() {
                return Err(Error::Unsupported(format!(
                    "{} holds only `{legacy}`, a pickle-based format that blip_peft never reads (unpickling \
                     can run arbitrary code). Convert it once with transformers: \
                     `BlipForConditionalGeneration.from_pretrained(dir).save_pretrained(dir)` writes \
                     `model.safetensors`.",
                    dir.display()
                )));
            }
        }
        Err(Error::not_found(
            format!("{WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME})"),
            dir.join(WEIGHTS_NAME),
        ))
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Result<Option<Vec<i64>>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let view = self.view(i, name)?;
        Ok(Some(view.shape().iter().map(|&d| d as i64).collect()))
    }

    /// The stored kind of `name`, if present and of a type torch has.
    pub fn kind(&self, name: &str) -> Result<Option<Kind>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        Ok(kind_of(self.view(i, name)?.dtype()))
    }

    fn view(&self, i: usize, name: &str) -> Result<TensorView<'_>> {
        let (path, map) = &self.maps[i];
        let st = SafeTensors::deserialize(map).map_err(|e| {
            Error::checkpoint(format!("{} is not a valid safetensors file: {e}", path.display()))
        })?;
        st.tensor(name).map_err(|e| {
            Error::checkpoint(format!(
                "cannot read tensor `{name}` from {}: {e}",
                path.display()
            ))
        })
    }

    /// Reads `name` as a CPU tensor of its stored kind.
    pub fn read(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let view = self.view(i, name)?;
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            Error::checkpoint(format!(
                "tensor `{name}` has unsupported dtype {:?}",
                view.dtype()
            ))
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Some(Tensor::f_from_data_size(view.data(), &shape, kind)?))
    }
}

/// A [`ParamSource`] that reads a checkpoint, checks every shape, and afterwards reports what the
/// checkpoint held that the model did not use.
pub struct CheckpointSource<'a> {
    files: &'a SafetensorsFiles,
    kind: Kind,
    device: Device,
    used: BTreeSet<String>,
    ignored: BTreeSet<String>,
}

impl<'a> CheckpointSource<'a> {
    pub fn new(files: &'a SafetensorsFiles, kind: Kind, device: Device) -> Self {
        Self {
            files,
            kind,
            device,
            used: BTreeSet::new(),
            ignored: BTreeSet::new(),
        }
    }

    /// Fails naming the checkpoint tensors no parameter took.
    pub fn finish(self) -> Result<()> {
        let unexpected: Vec<&String> = self
            .files
            .names()
            .filter(|n| !self.used.contains(*n) && !self.ignored.contains(*n))
            .collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = unexpected.iter().take(10).map(|n| format!("`{n}`")).collect();
        Err(Error::checkpoint(format!(
            "the checkpoint holds {} tensor(s) this model does not have: {}{} (is it a BLIP \
             image-captioning checkpoint with this config.json?)",
            unexpected.len(),
            shown.join(", "),
            if unexpected.len() > 10 { ", ..." } else { "" }
        )))
    }
}

impl ParamSource for CheckpointSource<'_> {
    fn stored(&mut self, name: &str) -> Result<Option<Tensor>> {
        self.files.read(name)
    }

    fn param(&mut self, name: &str, shape: &[i64], _init: Init, kind: Kind) -> Result<Tensor> {
        let t = self.files.read(name)?.ok_or_else(|| {
            Error::checkpoint(format!(
                "tensor `{name}` (shape {shape:?}) is missing from the checkpoint"
            ))
        })?;
        if t.size() != shape {
            return Err(Error::checkpoint(format!(
                "tensor `{name}` has shape {:?} in the checkpoint but the model expects {shape:?} (does \
                 config.json match the weights?)",
                t.size()
            )));
        }
        if !crate::nn::is_float_kind(t.kind()) {
            return Err(Error::checkpoint(format!(
                "tensor `{name}` is stored as {:?}; a floating-point type was expected",
                t.kind()
            )));
        }
        self.used.insert(name.to_string());
        Ok(t.f_to_kind(kind)?.f_to_device(self.device)?)
    }

    fn kind(&self) -> Kind {
        self.kind
    }

    fn ignore(&mut self, name: &str) {
        self.ignored.insert(name.to_string());
    }
}

/// Copies a tensor's bytes to host memory in a contiguous layout.
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut buf, numel)?;
    Ok(buf)
}

/// Writes `tensors` to a safetensors file atomically: a temporary file in the same folder, synced,
/// then renamed over `path`, so a crash never leaves a half-written file under the final name.
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), dtype_of(t.kind())?, shape, tensor_bytes(t)?));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::checkpoint(format!("cannot serialise `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::checkpoint(format!("cannot serialise tensors: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("cannot write {}", path.display()), e));
    }
    Ok(())
}
