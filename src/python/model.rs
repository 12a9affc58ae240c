//! `_BlipModel`: the native handle behind `blip_peft.BlipForConditionalGeneration`.
//!
//! Concurrency (docs/ARCHITECTURE.md, "Decisions"): the model sits behind a mutex. Read-only attributes
//! (`device`, `dtype`, `config`, `name_or_path`, `training`, `named_parameters`) come from a snapshot taken
//! after every call that changes the model, so they never wait for, or fail because of, another thread's
//! call. `generate` and `forward` from different threads take turns (the second waits, with the GIL
//! released); a call that would change the model while another one runs, or any call while training runs in
//! another thread, is a clear `RuntimeError` (busy), never a deadlock. A training callback may call `generate`
//! on the model being trained: the trainer lends it the weights for the callback's duration.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tch::Tensor;

use super::errors::{guard, IntoPyResult};
use super::{json, tensor};
use crate::blip::{BlipForConditionalGeneration, ForwardInputs, ForwardOptions, Record};
use crate::config::BlipConfig;
use crate::device::{device_name, parse_device, parse_dtype};
use crate::generate::GenerationConfig;
use crate::lora::{self, LoraConfig};
use crate::nn::ForwardContext;
use crate::weights::SafetensorsFiles;

type Model = BlipForConditionalGeneration;

/// A BLIP captioning model held by the Rust core. Use `blip_peft.BlipForConditionalGeneration`.
#[pyclass(module = "blip_peft._blip_peft", name = "_BlipModel", frozen)]
pub struct PyBlipModel {
    pub inner: Arc<Mutex<Model>>,
    /// Inference calls (`generate`, `forward`) from different threads take turns on this, then the model.
    turn: Mutex<()>,
    /// What the read-only attributes report, read without the model's lock.
    snapshot: Mutex<Snapshot>,
    /// The decoder rows of each forward pass of the last `generate` call (for tests and benchmarks).
    last_generate_rows: Mutex<Vec<i64>>,
}

/// The model's read-only attributes as of the last call that changed it. The parameters are the model's
/// own tensors (the same `at::Tensor`s, so Python sees the very parameters), only the list is a copy.
struct Snapshot {
    device: String,
    dtype: &'static str,
    name_or_path: String,
    config_json: String,
    training: bool,
    params: Vec<(String, Tensor)>,
}

impl Snapshot {
    fn of(m: &Model) -> Self {
        Self {
            device: device_name(m.device()),
            dtype: crate::blip::kind_name(m.kind()),
            name_or_path: m.name_or_path.clone(),
            config_json: m.config.to_json().to_string(),
            training: m.training,
            params: m.named_parameters(),
        }
    }
}

/// `(loss or None, logits, image_embeds, vision hidden states or None, vision attentions or None)` of a
/// forward pass, as torch tensors.
type ForwardResult<'py> = (
    Option<Bound<'py, PyAny>>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Vec<Bound<'py, PyAny>>>,
    Option<Vec<Bound<'py, PyAny>>>,
);

/// Locks a shared model. A model already busy (another thread's call that changes it, or training) is an
/// error, never a deadlock: the one place that says so.
pub fn locked<M>(inner: &Arc<Mutex<M>>) -> crate::Result<MutexGuard<'_, M>> {
    match inner.try_lock() {
        Ok(guard) => Ok(guard),
        Err(std::sync::TryLockError::WouldBlock) => Err(crate::Error::Busy(
            "the model is busy in another call (training, or a call that changes it); call it after that \
             returns (generate and the model's attributes may be used from a training callback)"
                .into(),
        )),
        Err(std::sync::TryLockError::Poisoned(_)) => Err(crate::Error::Busy(
            "the model is unusable after an internal error in an earlier call (a bug in blip_peft, reported \
             then); load the model again"
                .into(),
        )),
    }
}

thread_local! {
    /// The model a training run on this thread lends to its callback: (the handle's address, the model's).
    static LENT: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// Lends `model` (the one behind `inner`, which the trainer has locked) to calls made on this thread until
/// dropped: the training callback's `generate`. Sound because the trainer holds the model borrowed shared
/// for the whole callback and does not touch it until the callback returns, the lent address never leaves
/// this thread, and only read-only calls use it.
pub struct Lend(Option<(usize, usize)>);

impl Lend {
    pub fn new(inner: &Arc<Mutex<Model>>, model: &Model) -> Self {
        let key = Arc::as_ptr(inner) as usize;
        Self(LENT.with(|l| l.replace(Some((key, model as *const Model as usize)))))
    }
}

impl Drop for Lend {
    fn drop(&mut self) {
        LENT.with(|l| l.set(self.0));
    }
}

/// The address of the model lent to this thread for `inner`, if any.
fn lent(inner: &Arc<Mutex<Model>>) -> Option<usize> {
    let key = Arc::as_ptr(inner) as usize;
    LENT.with(|l| l.get()).and_then(|(k, m)| (k == key).then_some(m))
}

impl PyBlipModel {
    /// Locks the model for a call made with the GIL held (see [`locked`]).
    pub fn lock(&self) -> PyResult<MutexGuard<'_, Model>> {
        locked(&self.inner).py()
    }

    fn wrap(model: Model) -> Self {
        let snapshot = Snapshot::of(&model);
        Self {
            inner: Arc::new(Mutex::new(model)),
            turn: Mutex::new(()),
            snapshot: Mutex::new(snapshot),
            last_generate_rows: Mutex::new(Vec::new()),
        }
    }

    /// Takes a new snapshot of the read-only attributes (after a call that may have changed the model).
    pub fn refresh(&self, m: &Model) {
        let fresh = Snapshot::of(m);
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    fn snapshot(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a call that changes the model (GIL held), then refreshes the snapshot.
    fn mutate<R>(&self, f: impl FnOnce(&mut Model) -> crate::Result<R>) -> PyResult<R> {
        let mut m = self.lock()?;
        let result = f(&mut m);
        self.refresh(&m);
        result.py()
    }

    /// Runs a call that changes the model with the GIL released, then refreshes the snapshot.
    fn mutate_detached<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Model) -> crate::Result<R> + Send,
    ) -> PyResult<R> {
        py.detach(|| {
            let mut m = locked(&self.inner)?;
            let result = f(&mut m);
            self.refresh(&m);
            result
        })
        .py()
    }

    /// Runs an inference call with the GIL released: on the model a training callback was lent (when
    /// `lendable`), else after the inference calls of other threads (its turn), on the locked model.
    fn infer<R: Send>(
        &self,
        py: Python<'_>,
        lendable: bool,
        f: impl FnOnce(&Model) -> crate::Result<R> + Send,
    ) -> PyResult<R> {
        let lent = if lendable { lent(&self.inner) } else { None };
        py.detach(|| {
            if let Some(addr) = lent {
                // SAFETY: see `Lend`: the trainer on this very thread holds the model borrowed shared until
                // the callback running this call returns.
                return f(unsafe { &*(addr as *const Model) });
            }
            let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
            let m = locked(&self.inner)?;
            f(&m)
        })
        .py()
    }
}

#[pymethods]
impl PyBlipModel {
    /// Loads a transformers checkpoint folder. `dtype` is None (the stored precision), "float32",
    /// "bfloat16" or "float16"; `device` is "cpu", "cuda" or "cuda:N".
    /// `config_json`, when given, replaces the folder's `config.json` (transformers' `config=`).
    #[staticmethod]
    #[pyo3(signature = (path, dtype=None, device="cpu", config_json=None))]
    fn from_pretrained(
        py: Python<'_>,
        path: PathBuf,
        dtype: Option<&str>,
        device: &str,
        config_json: Option<&str>,
    ) -> PyResult<Self> {
        guard("from_pretrained", || {
            let kind = dtype.map(parse_dtype).transpose().py()?;
            let device = parse_device(device).py()?;
            let config = match config_json {
                Some(text) => Some(BlipConfig::from_json(parse_json(text)?).py()?),
                None => None,
            };
            let model = py
                .detach(|| Model::from_pretrained_with(&path, config, kind, device))
                .py()?;
            Ok(Self::wrap(model))
        })
    }

    /// A freshly initialised model from a `config.json` document (a JSON string), seeded.
    #[staticmethod]
    #[pyo3(signature = (config_json, seed=0, dtype=None, device="cpu"))]
    fn from_config(config_json: &str, seed: i64, dtype: Option<&str>, device: &str) -> PyResult<Self> {
        guard("from_config", || {
            let raw = parse_json(config_json)?;
            let config = BlipConfig::from_json(raw).py()?;
            let kind = dtype
                .map(parse_dtype)
                .transpose()
                .py()?
                .unwrap_or(tch::Kind::Float);
            let device = parse_device(device).py()?;
            Ok(Self::wrap(Model::random(config, seed, kind, device).py()?))
        })
    }

    /// Runs the model; returns `(loss or None, logits, image_embeds, hidden_states, attentions)` as torch
    /// tensors (the last two: lists of the vision tower's, when asked for, else None). `eager` writes
    /// attention out instead of SDPA; `logits_to_keep`, `shift_labels` and `interpolate_pos_encoding` are
    /// transformers' keywords; `adapter_names`: one adapter per row (a mixed-adapter batch, `"__base__"` for
    /// the base model).
    #[pyo3(signature = (pixel_values, input_ids, attention_mask=None, labels=None, *, output_hidden_states=false,
        output_attentions=false, eager=false, logits_to_keep=0, shift_labels=None, adapter_names=None,
        interpolate_pos_encoding=false))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        labels: Option<&Bound<'py, PyAny>>,
        output_hidden_states: bool,
        output_attentions: bool,
        eager: bool,
        logits_to_keep: i64,
        shift_labels: Option<&Bound<'py, PyAny>>,
        adapter_names: Option<Vec<String>>,
        interpolate_pos_encoding: bool,
    ) -> PyResult<ForwardResult<'py>> {
        guard("forward", || {
            let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let labels = tensor::from_py_opt(labels, "labels")?;
            let shift_labels = tensor::from_py_opt(shift_labels, "shift_labels")?;
            let record = Record {
                hidden_states: output_hidden_states,
                attentions: output_attentions,
                eager,
            };
            // Not lent to a training callback: a forward there would build a graph on the parameters being
            // trained (a loss.backward() would add into the trainer's gradients).
            let out = self.infer(py, false, move |model| {
                let batch = pixel_values.size().first().copied().unwrap_or(0);
                let rows = match &adapter_names {
                    Some(names) => Some(lora::mixed::adapter_rows(model, names, batch, model.training)?),
                    None => None,
                };
                let cx = ForwardContext::mode(model.training)
                    .with_interpolate_pos_encoding(interpolate_pos_encoding)
                    .with_adapters(rows.as_ref(), rows.as_ref());
                let options = ForwardOptions {
                    record,
                    logits_to_keep,
                    shift_labels: shift_labels.as_ref(),
                };
                let inputs = ForwardInputs {
                    pixel_values: &pixel_values,
                    input_ids: &input_ids,
                    attention_mask: attention_mask.as_ref(),
                    labels: labels.as_ref(),
                };
                model.forward_options(&inputs, &cx, &options)
            })?;
            let loss = out.loss.as_ref().map(|l| tensor::to_py(py, l)).transpose()?;
            let list = |wanted: bool, ts: &[tch::Tensor]| -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
                match wanted {
                    true => Ok(Some(
                        ts.iter().map(|t| tensor::to_py(py, t)).collect::<PyResult<_>>()?,
                    )),
                    false => Ok(None),
                }
            };
            Ok((
                loss,
                tensor::to_py(py, &out.logits)?,
                tensor::to_py(py, &out.image_embeds)?,
                list(output_hidden_states, &out.recorded.hidden_states)?,
                list(output_attentions, &out.recorded.attentions)?,
            ))
        })
    }

    /// Replaces the vocabulary-sized tensors by resized ones (see `BlipForConditionalGeneration.
    /// resize_token_embeddings`); `decoder_weight`/`decoder_bias` only for an untied head.
    #[pyo3(signature = (weight, bias, decoder_weight=None, decoder_bias=None))]
    fn resize_vocab(
        &self,
        weight: &Bound<'_, PyAny>,
        bias: &Bound<'_, PyAny>,
        decoder_weight: Option<&Bound<'_, PyAny>>,
        decoder_bias: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let weight = tensor::from_py(weight, "weight")?;
        let bias = tensor::from_py(bias, "bias")?;
        let decoder_weight = tensor::from_py_opt(decoder_weight, "decoder_weight")?;
        let decoder_bias = tensor::from_py_opt(decoder_bias, "decoder_bias")?;
        let decoder = match (&decoder_weight, &decoder_bias) {
            (Some(w), Some(b)) => Some((w, b)),
            (None, None) => None,
            _ => {
                return Err(PyValueError::new_err(
                    "pass both decoder_weight and decoder_bias, or neither",
                ))
            }
        };
        guard("resize_vocab", || {
            self.mutate(|m| m.resize_vocab(&weight, &bias, decoder))
        })
    }

    /// Whether the LM head's decoder is the word embeddings (tied, as the config says).
    #[getter]
    fn lm_head_tied(&self) -> PyResult<bool> {
        guard("lm_head_tied", || {
            Ok(self.lock()?.text_decoder.cls.predictions.decoder.tied)
        })
    }

    /// `(path, torch class name)` of every module in `named_modules()` order (the root as ""), as
    /// `print(model)` shows the tree (peft's wrappers included).
    fn module_tree(&self) -> PyResult<Vec<(String, String)>> {
        fn walk(node: &crate::repr::ReprNode, path: &str, out: &mut Vec<(String, String)>) {
            out.push((path.to_string(), node.type_name.clone()));
            for (name, child) in &node.children {
                walk(child, &crate::nn::join(path, name), out);
            }
        }
        let mut out = Vec::new();
        guard("module_tree", || {
            walk(&self.lock()?.repr_node(), "", &mut out);
            Ok(out)
        })
    }

    /// What loading this model's configuration warns about (transformers logs the same), one line each.
    fn config_warnings(&self) -> PyResult<Vec<String>> {
        guard("config_warnings", || Ok(self.lock()?.config.warnings()))
    }

    /// `(name, parameter)` pairs in transformers' order; the tensors are the model's own.
    fn named_parameters<'py>(&self, py: Python<'py>) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        guard("named_parameters", || {
            let params: Vec<(String, Tensor)> = self
                .snapshot()
                .params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
            params
                .into_iter()
                .map(|(n, t)| Ok((n, tensor::to_py(py, &t)?)))
                .collect()
        })
    }

    /// Moves parameters in place to `device` and/or casts floating ones to `dtype`.
    #[pyo3(signature = (device=None, dtype=None))]
    fn to(&self, py: Python<'_>, device: Option<&str>, dtype: Option<&str>) -> PyResult<()> {
        guard("to", || {
            let device = device.map(parse_device).transpose().py()?;
            let kind = dtype.map(parse_dtype).transpose().py()?;
            self.mutate_detached(py, move |model| model.to(device, kind))
        })
    }

    #[getter]
    fn training(&self) -> PyResult<bool> {
        guard("training", || Ok(self.snapshot().training))
    }

    fn set_training(&self, mode: bool) -> PyResult<()> {
        guard("set_training", || {
            self.mutate(|m| {
                m.training = mode;
                Ok(())
            })
        })
    }

    /// The device as torch spells it ("cpu", "cuda:0").
    #[getter]
    fn device(&self) -> PyResult<String> {
        guard("device", || Ok(self.snapshot().device.clone()))
    }

    /// The weights' dtype name ("float32", "bfloat16", "float16").
    #[getter]
    fn dtype(&self) -> PyResult<&'static str> {
        guard("dtype", || Ok(self.snapshot().dtype))
    }

    #[getter]
    fn name_or_path(&self) -> PyResult<String> {
        guard("name_or_path", || Ok(self.snapshot().name_or_path.clone()))
    }

    /// The configuration as a JSON string (transformers' `config.json` layout).
    fn config_json(&self) -> PyResult<String> {
        guard("config_json", || Ok(self.snapshot().config_json.clone()))
    }

    /// Writes `config.json` and `model.safetensors` into `path` (created if needed), atomically.
    fn save_pretrained(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        guard("save_pretrained", || {
            self.infer(py, true, move |model| model.save_pretrained(&path))
        })
    }

    fn __repr__(&self) -> PyResult<String> {
        guard("__repr__", || Ok(self.lock()?.repr()))
    }

    /// Generates token ids with transformers' semantics (see `blip_peft.BlipForConditionalGeneration.generate`).
    /// `settings` holds the decoding keywords as the caller gave them (`GenerationConfig` reads and checks them);
    /// `adapter_names`, one adapter per image (a mixed-adapter batch; its rows and beams inherit it).
    #[pyo3(signature = (pixel_values, input_ids=None, attention_mask=None, settings=None, adapter_names=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        input_ids: Option<&Bound<'py, PyAny>>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        settings: Option<&Bound<'py, PyDict>>,
        adapter_names: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("generate", || {
            let settings = match settings {
                Some(d) => json::from_dict(d)?,
                None => serde_json::Value::Object(Default::default()),
            };
            let config = GenerationConfig::from_settings(settings).py()?;
            let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
            let input_ids = tensor::from_py_opt(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let (ids, stats) = self.infer(py, true, move |model| {
                crate::generate::generate_with_adapters(
                    model,
                    &pixel_values,
                    input_ids.as_ref(),
                    attention_mask.as_ref(),
                    adapter_names.as_deref(),
                    &config,
                )
            })?;
            if let Ok(mut rows) = self.last_generate_rows.lock() {
                *rows = stats.rows_per_step;
            }
            tensor::to_py(py, &ids)
        })
    }

    /// The decoder rows of each forward pass of the last `generate` call: the prompt's, then one per new token
    /// (finished rows leave the batch). A diagnostic for tests and benchmarks.
    fn _last_generate_rows_per_step(&self) -> Vec<i64> {
        self.last_generate_rows
            .lock()
            .map(|rows| rows.clone())
            .unwrap_or_default()
    }

    // ------------------------------------------------------------------------------------------ LoRA

    /// Injects adapter `adapter_name` per a LoRA config (peft's adapter_config.json fields, as a dict or
    /// JSON text); returns the paths of the layers that got it.
    fn inject_lora(&self, config: &Bound<'_, PyAny>, adapter_name: &str) -> PyResult<Vec<String>> {
        guard("inject_lora", || {
            let config = lora_config(config)?;
            self.mutate(|m| lora::inject(m, &config, adapter_name))
        })
    }

    /// Freezes the base and makes `adapter_name` (and the biases of `bias` mode) trainable.
    fn mark_trainable(&self, adapter_name: &str, bias: &str) -> PyResult<()> {
        guard("mark_trainable", || {
            self.mutate(|m| lora::inject::mark_trainable(m, adapter_name, bias))
        })
    }

    /// `(path, layer type, in, out)` of every layer LoRA can target.
    fn lora_targets(&self) -> PyResult<Vec<(String, String, i64, i64)>> {
        guard("lora_targets", || {
            let targets = lora::inject::targetable_layers(&mut *self.lock()?).py()?;
            Ok(targets
                .into_iter()
                .map(|t| (t.path, t.layer_type.to_string(), t.in_features, t.out_features))
                .collect())
        })
    }

    fn set_active_adapter(&self, adapter_name: &str) -> PyResult<()> {
        guard("set_active_adapter", || {
            self.mutate(|m| lora::inject::set_active(m, adapter_name))
        })
    }

    fn merge_adapters(&self) -> PyResult<()> {
        guard("merge_adapters", || self.mutate(lora::inject::merge))
    }

    fn unmerge_adapters(&self) -> PyResult<()> {
        guard("unmerge_adapters", || self.mutate(lora::inject::unmerge))
    }

    fn set_adapters_disabled(&self, disabled: bool) -> PyResult<()> {
        guard("set_adapters_disabled", || {
            self.mutate(|m| lora::inject::set_disabled(m, disabled))
        })
    }

    /// Removes every adapter, merging the active ones first when `merge`.
    fn unload_adapters(&self, merge: bool) -> PyResult<()> {
        guard("unload_adapters", || {
            self.mutate(|m| lora::inject::unload(m, merge))
        })
    }

    fn delete_adapter(&self, adapter_name: &str) -> PyResult<()> {
        guard("delete_adapter", || {
            self.mutate(|m| lora::inject::delete(m, adapter_name))
        })
    }

    fn adapter_names(&self) -> PyResult<Vec<String>> {
        guard("adapter_names", || {
            lora::inject::adapter_names(&mut *self.lock()?).py()
        })
    }

    /// `(peft file key, tensor)` pairs of an adapter, as peft saves them.
    fn adapter_state<'py>(
        &self,
        py: Python<'py>,
        adapter_name: &str,
        bias: &str,
    ) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        guard("adapter_state", || {
            let state = lora::inject::adapter_state(&mut *self.lock()?, adapter_name, bias).py()?;
            state
                .into_iter()
                .map(|(k, t)| Ok((k, tensor::to_py(py, &t)?)))
                .collect()
        })
    }

    /// Writes peft's adapter folder for `adapter_name` (`config_json`: its adapter_config.json text).
    fn save_adapter(&self, dir: PathBuf, adapter_name: &str, bias: &str, config_json: &str) -> PyResult<()> {
        guard("save_adapter", || {
            lora::inject::save_adapter(&mut *self.lock()?, &dir, adapter_name, bias, config_json).py()
        })
    }

    /// Loads an adapter file (safetensors) into the injected adapter `adapter_name`; every key must fit.
    fn load_adapter(&self, path: PathBuf, adapter_name: &str, bias: &str) -> PyResult<()> {
        guard("load_adapter", || {
            let tensors = read_safetensors(&path)?;
            self.mutate(|m| lora::inject::load_adapter_state(m, adapter_name, bias, &tensors))
        })
    }

    /// Replaces adapter `adapter_name`'s weights in place by an adapter file made for the same layers and ranks
    /// (`config_json`: its adapter_config.json), on the live model.
    fn hotswap_adapter(&self, path: PathBuf, adapter_name: &str, config_json: &str) -> PyResult<()> {
        guard("hotswap_adapter", || {
            let config = LoraConfig::from_json(&parse_json(config_json)?).py()?;
            let tensors = read_safetensors(&path)?;
            self.mutate(|m| lora::inject::hotswap_adapter(m, adapter_name, &config, &tensors))
        })
    }
}

pub(super) fn read_safetensors(
    path: &std::path::Path,
) -> PyResult<std::collections::BTreeMap<String, tch::Tensor>> {
    let files = SafetensorsFiles::open(&[path.to_path_buf()]).py()?;
    let mut tensors = std::collections::BTreeMap::new();
    for name in files.names().cloned().collect::<Vec<_>>() {
        if let Some(t) = files.read(&name).py()? {
            tensors.insert(name, t);
        }
    }
    Ok(tensors)
}

/// A LoRA config given as a dict of its fields (values refused by name where JSON cannot hold them: NaN,
/// infinities, integers past 64 bits) or as `adapter_config.json` text, checked by the core.
pub(super) fn lora_config(config: &Bound<'_, PyAny>) -> PyResult<LoraConfig> {
    let raw = match config.cast::<PyDict>() {
        Ok(d) => json::from_dict(d)?,
        Err(_) => parse_json(&config.extract::<String>()?)?,
    };
    LoraConfig::from_json(&raw).py()
}

pub(super) fn parse_json(text: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| PyValueError::new_err(format!("invalid JSON: {e}")))
}

/// Validates a LoRA config given as a dict (or JSON text) and returns it normalised to peft's
/// `adapter_config.json`.
#[pyfunction]
pub fn normalize_lora_config(config: &Bound<'_, PyAny>) -> PyResult<String> {
    guard("normalize_lora_config", || {
        Ok(lora_config(config)?.to_json().to_string())
    })
}
