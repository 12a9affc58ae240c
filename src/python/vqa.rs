//! `_BlipVqaModel`: the native handle behind `blip_peft.BlipForQuestionAnswering`: its forward and generate;
//! the concurrency rules (snapshot, turns, busy is an error) and the methods every head has are `handle.rs`'s.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{guard, IntoPyResult};
use super::handle::{head_handle, Handle};
use super::{json, tensor};
use crate::blip::{BlipForQuestionAnswering, VqaInputs};
use crate::generate::GenerationConfig;
use crate::lora;
use crate::nn::ForwardContext;

type Model = BlipForQuestionAnswering;

/// A BLIP visual-question-answering model held by the Rust core. Use `blip_peft.BlipForQuestionAnswering`.
#[pyclass(module = "blip_peft._blip_peft", name = "_BlipVqaModel", frozen)]
pub struct PyBlipVqaModel {
    handle: Handle<Model>,
}

/// `(loss or None, image_embeds, question_embeds, logits)` of a forward pass, as torch tensors.
type VqaResult<'py> = (
    Option<Bound<'py, PyAny>>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
);

impl PyBlipVqaModel {
    fn wrap(model: Model) -> Self {
        Self {
            handle: Handle::new(model),
        }
    }
}

head_handle!(PyBlipVqaModel, Model, {
    /// Runs the model (transformers' `BlipForQuestionAnswering.forward`); returns `(loss or None,
    /// image_embeds, question_embeds, logits)` as torch tensors sharing libtorch's autograd graph;
    /// `adapter_names`: one adapter per row (a mixed-adapter batch, `"__base__"` for the base model).
    #[pyo3(signature = (input_ids, pixel_values, decoder_input_ids=None, decoder_attention_mask=None,
        attention_mask=None, labels=None, *, interpolate_pos_encoding=false, adapter_names=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        pixel_values: &Bound<'py, PyAny>,
        decoder_input_ids: Option<&Bound<'py, PyAny>>,
        decoder_attention_mask: Option<&Bound<'py, PyAny>>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        labels: Option<&Bound<'py, PyAny>>,
        interpolate_pos_encoding: bool,
        adapter_names: Option<Vec<String>>,
    ) -> PyResult<VqaResult<'py>> {
        guard("forward", || {
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
            let decoder_input_ids = tensor::from_py_opt(decoder_input_ids, "decoder_input_ids")?;
            let decoder_attention_mask =
                tensor::from_py_opt(decoder_attention_mask, "decoder_attention_mask")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let labels = tensor::from_py_opt(labels, "labels")?;
            let out = self.infer(py, false, move |model| {
                let batch = pixel_values.size().first().copied().unwrap_or(0);
                let rows = adapter_names
                    .map(|names| lora::mixed::adapter_rows(model, &names, batch, model.training))
                    .transpose()?;
                let cx = ForwardContext::mode(model.training)
                    .with_interpolate_pos_encoding(interpolate_pos_encoding)
                    .with_adapters(rows.as_ref(), rows.as_ref());
                let inputs = VqaInputs {
                    input_ids: &input_ids,
                    pixel_values: &pixel_values,
                    attention_mask: attention_mask.as_ref(),
                    decoder_input_ids: decoder_input_ids.as_ref(),
                    decoder_attention_mask: decoder_attention_mask.as_ref(),
                    labels: labels.as_ref(),
                };
                model.forward_with(&inputs, &cx)
            })?;
            Ok((
                out.loss.as_ref().map(|l| tensor::to_py(py, l)).transpose()?,
                tensor::to_py(py, &out.image_embeds)?,
                tensor::to_py(py, &out.question_embeds)?,
                tensor::to_py(py, &out.logits)?,
            ))
        })
    }

    /// Replaces the vocabulary-sized tensors by resized ones (see `BlipForQuestionAnswering.
    /// resize_token_embeddings`): the question encoder's table, the answer decoder's, its head's bias, and
    /// `decoder_weight`/`decoder_bias` only for an untied head.
    #[pyo3(signature = (encoder_weight, weight, bias, decoder_weight=None, decoder_bias=None))]
    fn resize_vocab(
        &self,
        encoder_weight: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        bias: &Bound<'_, PyAny>,
        decoder_weight: Option<&Bound<'_, PyAny>>,
        decoder_bias: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let encoder_weight = tensor::from_py(encoder_weight, "encoder_weight")?;
        let weight = tensor::from_py(weight, "weight")?;
        let bias = tensor::from_py(bias, "bias")?;
        let decoder = super::model::untied_decoder(decoder_weight, decoder_bias)?;
        guard("resize_vocab", || {
            let decoder = decoder.as_ref().map(|(w, b)| (w, b));
            self.mutate(|m| m.resize_vocab(&encoder_weight, &weight, &bias, decoder))
        })
    }

    /// Generates answer token ids with transformers' semantics (see
    /// `blip_peft.BlipForQuestionAnswering.generate`): `input_ids` is the question; `settings` holds the
    /// decoding keywords as the caller gave them (`GenerationConfig` reads and checks them); `adapter_names`, one
    /// adapter per image (a mixed-adapter batch; its rows and beams inherit it).
    #[pyo3(signature = (pixel_values, input_ids, attention_mask=None, settings=None, adapter_names=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        input_ids: &Bound<'py, PyAny>,
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
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let (ids, _) = self.infer(py, false, move |model| {
                crate::generate::generate_answers(
                    model,
                    &pixel_values,
                    &input_ids,
                    attention_mask.as_ref(),
                    adapter_names.as_deref(),
                    &config,
                )
            })?;
            tensor::to_py(py, &ids)
        })
    }
});
