//! `_BlipModel`: the native handle behind `blip_peft.BlipForConditionalGeneration`: the captioner's own
//! methods (forward, generate, the vocabulary resize); the concurrency rules and the methods every head has
//! are `handle.rs`'s (docs/ARCHITECTURE.md, "Decisions"). A training callback may call `generate` on the
//! model being trained: the trainer lends it the weights for the callback's duration ([`Lend`]).

use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{guard, IntoPyResult};
use super::handle::{head_handle, tensor_list, Handle};
pub use super::handle::{locked, Lend};
use super::{json, tensor};
use crate::blip::{BlipForConditionalGeneration, ForwardInputs, ForwardOptions, Record};
use crate::generate::GenerationConfig;
use crate::lora::{self, LoraConfig};
use crate::nn::ForwardContext;
use crate::weights::SafetensorsFiles;

type Model = BlipForConditionalGeneration;

/// A BLIP captioning model held by the Rust core. Use `blip_peft.BlipForConditionalGeneration`.
#[pyclass(module = "blip_peft._blip_peft", name = "_BlipModel", frozen)]
pub struct PyBlipModel {
    pub handle: Handle<Model>,
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

impl PyBlipModel {
    fn wrap(model: Model) -> Self {
        Self {
            handle: Handle::new(model),
            last_generate_rows: Mutex::new(Vec::new()),
        }
    }
}

head_handle!(PyBlipModel, Model, {
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
            Ok((
                loss,
                tensor::to_py(py, &out.logits)?,
                tensor::to_py(py, &out.image_embeds)?,
                tensor_list(py, output_hidden_states, &out.recorded.hidden_states)?,
                tensor_list(py, output_attentions, &out.recorded.attentions)?,
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
        let decoder = untied_decoder(decoder_weight, decoder_bias)?;
        guard("resize_vocab", || {
            let decoder = decoder.as_ref().map(|(w, b)| (w, b));
            self.mutate(|m| m.resize_vocab(&weight, &bias, decoder))
        })
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
});

/// An untied LM head's resized `(weight, bias)`: both given, or neither.
pub(crate) fn untied_decoder(
    weight: Option<&Bound<'_, PyAny>>,
    bias: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<(tch::Tensor, tch::Tensor)>> {
    match (
        tensor::from_py_opt(weight, "decoder_weight")?,
        tensor::from_py_opt(bias, "decoder_bias")?,
    ) {
        (Some(w), Some(b)) => Ok(Some((w, b))),
        (None, None) => Ok(None),
        _ => Err(PyValueError::new_err(
            "pass both decoder_weight and decoder_bias, or neither",
        )),
    }
}

pub(crate) fn read_safetensors(
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
pub(crate) fn lora_config(config: &Bound<'_, PyAny>) -> PyResult<LoraConfig> {
    let raw = match config.cast::<PyDict>() {
        Ok(d) => json::from_dict(d)?,
        Err(_) => parse_json(&config.extract::<String>()?)?,
    };
    LoraConfig::from_json(&raw).py()
}

pub(crate) fn parse_json(text: &str) -> PyResult<serde_json::Value> {
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
