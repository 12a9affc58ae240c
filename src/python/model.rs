//! `_BlipModel`: the native handle behind `blip_peft.BlipForConditionalGeneration`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::IntoPyResult;
use super::{json, tensor};
use crate::blip::{BlipForConditionalGeneration, ForwardInputs, ForwardOptions, Record};
use crate::config::BlipConfig;
use crate::device::{device_name, parse_device, parse_dtype};
use crate::generate::GenerationConfig;
use crate::lora::{self, LoraConfig};
use crate::nn::ForwardContext;
use crate::weights::SafetensorsFiles;

/// A BLIP captioning model held by the Rust core. Use `blip_peft.BlipForConditionalGeneration`.
#[pyclass(module = "blip_peft._blip_peft", name = "_BlipModel", frozen)]
pub struct PyBlipModel {
    pub inner: Arc<Mutex<BlipForConditionalGeneration>>,
    /// The decoder rows of each forward pass of the last `generate` call (for tests and benchmarks).
    last_generate_rows: Mutex<Vec<i64>>,
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

/// Locks a shared model. A model already busy (e.g. a training callback calling `generate` on the model
/// being trained, or another thread) is an error, never a deadlock: the one place that says so.
pub fn locked(
    inner: &Arc<Mutex<BlipForConditionalGeneration>>,
) -> crate::Result<MutexGuard<'_, BlipForConditionalGeneration>> {
    match inner.try_lock() {
        Ok(guard) => Ok(guard),
        Err(std::sync::TryLockError::WouldBlock) => Err(crate::Error::Busy(
            "the model is busy in another call (training or generating); call it after that returns".into(),
        )),
        Err(std::sync::TryLockError::Poisoned(_)) => Err(crate::Error::Busy(
            "the model is unusable after an earlier crash".into(),
        )),
    }
}

impl PyBlipModel {
    /// Locks the model for a call made with the GIL held (see [`locked`]).
    pub fn lock(&self) -> PyResult<MutexGuard<'_, BlipForConditionalGeneration>> {
        locked(&self.inner).py()
    }

    fn wrap(model: BlipForConditionalGeneration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(model)),
            last_generate_rows: Mutex::new(Vec::new()),
        }
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
        let kind = dtype.map(parse_dtype).transpose().py()?;
        let device = parse_device(device).py()?;
        let config = match config_json {
            Some(text) => Some(BlipConfig::from_json(parse_json(text)?).py()?),
            None => None,
        };
        let model = py
            .detach(|| BlipForConditionalGeneration::from_pretrained_with(&path, config, kind, device))
            .py()?;
        Ok(Self::wrap(model))
    }

    /// A freshly initialised model from a `config.json` document (a JSON string), seeded.
    #[staticmethod]
    #[pyo3(signature = (config_json, seed=0, dtype=None, device="cpu"))]
    fn from_config(config_json: &str, seed: i64, dtype: Option<&str>, device: &str) -> PyResult<Self> {
        let raw = parse_json(config_json)?;
        let config = BlipConfig::from_json(raw).py()?;
        let kind = dtype
            .map(parse_dtype)
            .transpose()
            .py()?
            .unwrap_or(tch::Kind::Float);
        let device = parse_device(device).py()?;
        Ok(Self::wrap(
            BlipForConditionalGeneration::random(config, seed, kind, device).py()?,
        ))
    }

    /// Runs the model; returns `(loss or None, logits, image_embeds, hidden_states, attentions)` as torch
    /// tensors (the last two: lists of the vision tower's, when asked for, else None). `eager` writes
    /// attention out instead of SDPA; `logits_to_keep`, `shift_labels` and `interpolate_pos_encoding` are
    /// transformers' keywords.
    #[pyo3(signature = (pixel_values, input_ids, attention_mask=None, labels=None, *, output_hidden_states=false,
        output_attentions=false, eager=false, logits_to_keep=0, shift_labels=None, interpolate_pos_encoding=false))]
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
        interpolate_pos_encoding: bool,
    ) -> PyResult<ForwardResult<'py>> {
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
        let inner = self.inner.clone();
        let out = py
            .detach(move || {
                let model = locked(&inner)?;
                let cx = ForwardContext::mode(model.training)
                    .with_interpolate_pos_encoding(interpolate_pos_encoding);
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
            })
            .py()?;
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
        self.lock()?.resize_vocab(&weight, &bias, decoder).py()
    }

    /// Whether the LM head's decoder is the word embeddings (tied, as the config says).
    #[getter]
    fn lm_head_tied(&self) -> PyResult<bool> {
        Ok(self.lock()?.text_decoder.cls.predictions.decoder.tied)
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
        walk(&self.lock()?.repr_node(), "", &mut out);
        Ok(out)
    }

    /// What loading this model's configuration warns about (transformers logs the same), one line each.
    fn config_warnings(&self) -> PyResult<Vec<String>> {
        Ok(self.lock()?.config.warnings())
    }

    /// `(name, parameter)` pairs in transformers' order; the tensors are the model's own.
    fn named_parameters<'py>(&self, py: Python<'py>) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        let params = self.lock()?.named_parameters();
        params
            .into_iter()
            .map(|(n, t)| Ok((n, tensor::to_py(py, &t)?)))
            .collect()
    }

    /// Moves parameters in place to `device` and/or casts floating ones to `dtype`.
    #[pyo3(signature = (device=None, dtype=None))]
    fn to(&self, py: Python<'_>, device: Option<&str>, dtype: Option<&str>) -> PyResult<()> {
        let device = device.map(parse_device).transpose().py()?;
        let kind = dtype.map(parse_dtype).transpose().py()?;
        let inner = self.inner.clone();
        py.detach(move || {
            let model = locked(&inner)?;
            model.to(device, kind)
        })
        .py()
    }

    #[getter]
    fn training(&self) -> PyResult<bool> {
        Ok(self.lock()?.training)
    }

    fn set_training(&self, mode: bool) -> PyResult<()> {
        self.lock()?.training = mode;
        Ok(())
    }

    /// The device as torch spells it ("cpu", "cuda:0").
    #[getter]
    fn device(&self) -> PyResult<String> {
        Ok(device_name(self.lock()?.device()))
    }

    /// The weights' dtype name ("float32", "bfloat16", "float16").
    #[getter]
    fn dtype(&self) -> PyResult<&'static str> {
        Ok(crate::blip::kind_name(self.lock()?.kind()))
    }

    #[getter]
    fn name_or_path(&self) -> PyResult<String> {
        Ok(self.lock()?.name_or_path.clone())
    }

    /// The configuration as a JSON string (transformers' `config.json` layout).
    fn config_json(&self) -> PyResult<String> {
        Ok(self.lock()?.config.to_json().to_string())
    }

    /// Writes `config.json` and `model.safetensors` into `path` (created if needed), atomically.
    fn save_pretrained(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let inner = self.inner.clone();
        py.detach(move || {
            let model = locked(&inner)?;
            model.save_pretrained(&path)
        })
        .py()
    }

    fn __repr__(&self) -> PyResult<String> {
        Ok(self.lock()?.repr())
    }

    /// Generates token ids with transformers' semantics (see `blip_peft.BlipForConditionalGeneration.generate`).
    /// `settings` holds the decoding keywords as the caller gave them (`GenerationConfig` reads and checks them).
    #[pyo3(signature = (pixel_values, input_ids=None, attention_mask=None, settings=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        input_ids: Option<&Bound<'py, PyAny>>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        settings: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let settings = match settings {
            Some(d) => json::from_dict(d)?,
            None => serde_json::Value::Object(Default::default()),
        };
        let config = GenerationConfig::from_settings(settings).py()?;
        let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
        let input_ids = tensor::from_py_opt(input_ids, "input_ids")?;
        let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
        let inner = self.inner.clone();
        let (ids, stats) = py
            .detach(move || {
                let model = locked(&inner)?;
                crate::generate::generate_with_stats(
                    &model,
                    &pixel_values,
                    input_ids.as_ref(),
                    attention_mask.as_ref(),
                    &config,
                )
            })
            .py()?;
        if let Ok(mut rows) = self.last_generate_rows.lock() {
            *rows = stats.rows_per_step;
        }
        tensor::to_py(py, &ids)
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

    /// Injects adapter `adapter_name` per a LoRA config (peft's adapter_config.json fields, as JSON);
    /// returns the paths of the layers that got it.
    fn inject_lora(&self, config_json: &str, adapter_name: &str) -> PyResult<Vec<String>> {
        let config = LoraConfig::from_json(&parse_json(config_json)?).py()?;
        lora::inject(&mut *self.lock()?, &config, adapter_name).py()
    }

    /// Freezes the base and makes `adapter_name` (and the biases of `bias` mode) trainable.
    fn mark_trainable(&self, adapter_name: &str, bias: &str) -> PyResult<()> {
        lora::inject::mark_trainable(&mut *self.lock()?, adapter_name, bias).py()
    }

    /// `(path, layer type, in, out)` of every layer LoRA can target.
    fn lora_targets(&self) -> PyResult<Vec<(String, String, i64, i64)>> {
        let targets = lora::inject::targetable_layers(&mut *self.lock()?).py()?;
        Ok(targets
            .into_iter()
            .map(|t| (t.path, t.layer_type.to_string(), t.in_features, t.out_features))
            .collect())
    }

    fn set_active_adapter(&self, adapter_name: &str) -> PyResult<()> {
        lora::inject::set_active(&mut *self.lock()?, adapter_name).py()
    }

    fn merge_adapters(&self) -> PyResult<()> {
        lora::inject::merge(&mut *self.lock()?).py()
    }

    fn unmerge_adapters(&self) -> PyResult<()> {
        lora::inject::unmerge(&mut *self.lock()?).py()
    }

    fn set_adapters_disabled(&self, disabled: bool) -> PyResult<()> {
        lora::inject::set_disabled(&mut *self.lock()?, disabled).py()
    }

    /// Removes every adapter, merging the active ones first when `merge`.
    fn unload_adapters(&self, merge: bool) -> PyResult<()> {
        lora::inject::unload(&mut *self.lock()?, merge).py()
    }

    fn delete_adapter(&self, adapter_name: &str) -> PyResult<()> {
        lora::inject::delete(&mut *self.lock()?, adapter_name).py()
    }

    fn adapter_names(&self) -> PyResult<Vec<String>> {
        lora::inject::adapter_names(&mut *self.lock()?).py()
    }

    /// `(peft file key, tensor)` pairs of an adapter, as peft saves them.
    fn adapter_state<'py>(
        &self,
        py: Python<'py>,
        adapter_name: &str,
        bias: &str,
    ) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        let state = lora::inject::adapter_state(&mut *self.lock()?, adapter_name, bias).py()?;
        state
            .into_iter()
            .map(|(k, t)| Ok((k, tensor::to_py(py, &t)?)))
            .collect()
    }

    /// Writes peft's adapter folder for `adapter_name` (`config_json`: its adapter_config.json text).
    fn save_adapter(&self, dir: PathBuf, adapter_name: &str, bias: &str, config_json: &str) -> PyResult<()> {
        lora::inject::save_adapter(&mut *self.lock()?, &dir, adapter_name, bias, config_json).py()
    }

    /// Loads an adapter file (safetensors) into the injected adapter `adapter_name`; every key must fit.
    fn load_adapter(&self, path: PathBuf, adapter_name: &str, bias: &str) -> PyResult<()> {
        let files = SafetensorsFiles::open(std::slice::from_ref(&path)).py()?;
        let mut tensors = std::collections::BTreeMap::new();
        for name in files.names().cloned().collect::<Vec<_>>() {
            if let Some(t) = files.read(&name).py()? {
                tensors.insert(name, t);
            }
        }
        lora::inject::load_adapter_state(&mut *self.lock()?, adapter_name, bias, &tensors).py()
    }
}

fn parse_json(text: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| PyValueError::new_err(format!("invalid JSON: {e}")))
}

/// Validates a LoRA config given as JSON and returns it normalised to peft's `adapter_config.json`.
#[pyfunction]
pub fn normalize_lora_config(config_json: &str) -> PyResult<String> {
    let config = LoraConfig::from_json(&parse_json(config_json)?).py()?;
    Ok(config.to_json().to_string())
}
