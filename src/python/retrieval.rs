//! `_BlipRetrievalModel`: the native handle behind `blip_peft.BlipForImageTextRetrieval`: its forward, the
//! scoring pieces (features, ITM logits) and BLIP's losses; the concurrency rules (snapshot, turns, busy is
//! an error) and the methods every head has are `handle.rs`'s.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::guard;
use super::handle::{head_handle, tensor_list, Handle};
use super::tensor;
use crate::blip::retrieval::BlipForImageTextRetrieval;
use crate::blip::Record;
use crate::nn::{AdapterRows, ForwardContext};

type Model = BlipForImageTextRetrieval;

/// A BLIP image-text retrieval model held by the Rust core. Use `blip_peft.BlipForImageTextRetrieval`.
#[pyclass(module = "blip_peft._blip_peft", name = "_BlipRetrievalModel", frozen)]
pub struct PyBlipRetrievalModel {
    pub handle: Handle<Model>,
}

/// `(itm_score, image_embeds, question_embeds, vision hidden states or None, vision attentions or None)`.
type ForwardResult<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Vec<Bound<'py, PyAny>>>,
    Option<Vec<Bound<'py, PyAny>>>,
);

impl PyBlipRetrievalModel {
    fn wrap(model: Model) -> Self {
        Self {
            handle: Handle::new(model),
        }
    }
}

/// The rows of a mixed-adapter call over `batch` rows (one adapter each, `"__base__"` for the base model),
/// checked as peft checks them; None without `adapter_names`.
fn adapter_rows(model: &Model, names: Option<Vec<String>>, batch: i64) -> crate::Result<Option<AdapterRows>> {
    names
        .map(|names| crate::lora::mixed::adapter_rows(model, &names, batch, model.training))
        .transpose()
}

head_handle!(PyBlipRetrievalModel, Model, {
    /// transformers' forward: `(itm_score, image_embeds, question_embeds, hidden_states, attentions)`;
    /// `adapter_names`: one adapter per row (a mixed-adapter batch: as many texts as images).
    #[pyo3(signature = (pixel_values, input_ids, attention_mask=None, use_itm_head=true, *,
        output_hidden_states=false, output_attentions=false, eager=false, interpolate_pos_encoding=false,
        adapter_names=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        use_itm_head: bool,
        output_hidden_states: bool,
        output_attentions: bool,
        eager: bool,
        interpolate_pos_encoding: bool,
        adapter_names: Option<Vec<String>>,
    ) -> PyResult<ForwardResult<'py>> {
        guard("forward", || {
            let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let record = Record {
                hidden_states: output_hidden_states,
                attentions: output_attentions,
                eager,
            };
            let out = self.infer(py, false, move |model| {
                let images = pixel_values.size().first().copied().unwrap_or(0);
                let texts = input_ids.size().first().copied().unwrap_or(0);
                if adapter_names.is_some() && texts != images {
                    return Err(crate::Error::invalid(format!(
                        "adapter_names needs as many texts as images (one adapter per row), got {texts} texts \
                         and {images} images; score each adapter's texts in a call of their own"
                    )));
                }
                let rows = adapter_rows(model, adapter_names, images)?;
                let cx = ForwardContext::mode(model.training)
                    .with_interpolate_pos_encoding(interpolate_pos_encoding)
                    .with_adapters(rows.as_ref(), rows.as_ref());
                model.forward(
                    &pixel_values,
                    &input_ids,
                    attention_mask.as_ref(),
                    use_itm_head,
                    record,
                    &cx,
                )
            })?;
            Ok((
                tensor::to_py(py, &out.itm_score)?,
                tensor::to_py(py, &out.image_embeds)?,
                tensor::to_py(py, &out.question_embeds)?,
                tensor_list(py, output_hidden_states, &out.recorded.hidden_states)?,
                tensor_list(py, output_attentions, &out.recorded.attentions)?,
            ))
        })
    }

    /// Replaces the text encoder's word embeddings by resized ones `weight` (see
    /// `BlipForImageTextRetrieval.resize_token_embeddings`).
    fn resize_vocab(&self, weight: &Bound<'_, PyAny>) -> PyResult<()> {
        let weight = tensor::from_py(weight, "weight")?;
        guard("resize_vocab", || self.mutate(|m| m.resize_vocab(&weight)))
    }

    /// `(image features [B, image_text_hidden_size] (normalised), image embeddings [B, N, D])` of pixels.
    #[pyo3(signature = (pixel_values, interpolate_pos_encoding=false, adapter_names=None))]
    fn encode_images<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        interpolate_pos_encoding: bool,
        adapter_names: Option<Vec<String>>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        guard("encode_images", || {
            let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
            let (feat, embeds) = self.infer(py, false, move |model| {
                let batch = pixel_values.size().first().copied().unwrap_or(0);
                let rows = adapter_rows(model, adapter_names, batch)?;
                let cx = ForwardContext::mode(model.training)
                    .with_interpolate_pos_encoding(interpolate_pos_encoding)
                    .with_adapters(rows.as_ref(), rows.as_ref());
                let px = model.check_pixel_values(&pixel_values, &cx)?;
                let embeds = model.encode_images(&px, &cx)?;
                Ok((model.image_features(&embeds, &cx)?, embeds))
            })?;
            Ok((tensor::to_py(py, &feat)?, tensor::to_py(py, &embeds)?))
        })
    }

    /// The normalised text features `[B, image_text_hidden_size]` (the encoder without cross-attention).
    #[pyo3(signature = (input_ids, attention_mask=None, adapter_names=None))]
    fn encode_texts<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        adapter_names: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("encode_texts", || {
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let feat = self.infer(py, false, move |model| {
                let batch = input_ids.size().first().copied().unwrap_or(0);
                let rows = adapter_rows(model, adapter_names, batch)?;
                let cx = ForwardContext::mode(model.training).with_adapters(rows.as_ref(), rows.as_ref());
                let (ids, mask) = model.check_text(&input_ids, attention_mask.as_ref())?;
                let hidden = model.encode_text(&ids, mask.as_ref(), None, &cx)?;
                model.text_features(&hidden, &cx)
            })?;
            tensor::to_py(py, &feat)
        })
    }

    /// The matching logits `[B, 2]` of texts over image embeddings (`encode_images`' second output): row i
    /// with image i, or with image `image_index[i]` when given (each image's keys/values then computed once
    /// for all its texts).
    #[pyo3(signature = (image_embeds, input_ids, attention_mask=None, adapter_names=None, image_index=None))]
    fn itm_logits<'py>(
        &self,
        py: Python<'py>,
        image_embeds: &Bound<'py, PyAny>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        adapter_names: Option<Vec<String>>,
        image_index: Option<Vec<i64>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("itm_logits", || {
            let image_embeds = tensor::from_py(image_embeds, "image_embeds")?;
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let logits = self.infer(py, false, move |model| {
                let batch = input_ids.size().first().copied().unwrap_or(0);
                let rows = adapter_rows(model, adapter_names, batch)?;
                let cx = ForwardContext::mode(model.training).with_adapters(rows.as_ref(), rows.as_ref());
                let (ids, mask) = model.check_text(&input_ids, attention_mask.as_ref())?;
                let d = model.config.vision_config.hidden_size;
                let size = image_embeds.size();
                // Without image_index, one image per text; with it, any number of images.
                let per_text = image_index.is_none().then(|| ids.size()[0]);
                if size.len() != 3 || size[2] != d || per_text.is_some_and(|b| size[0] != b) {
                    let expected = match per_text {
                        Some(b) => format!("[{b}, image tokens, {d}] (one image per text)"),
                        None => format!("[images, image tokens, {d}]"),
                    };
                    return Err(crate::Error::invalid(format!(
                        "image_embeds must have shape {expected}, got {size:?}"
                    )));
                }
                let embeds = image_embeds
                    .f_to_device(model.device())?
                    .f_to_kind(model.kind())?;
                match &image_index {
                    Some(index) => model.itm_logits_over_images(&ids, mask.as_ref(), &embeds, index, &cx),
                    None => Ok(model.itm_logits(&ids, mask.as_ref(), &embeds, &cx)?.0),
                }
            })?;
            tensor::to_py(py, &logits)
        })
    }

    /// BLIP's retrieval losses for pairs (text i describes image i): a dict with `loss_itc`, `loss_itm`,
    /// `negative_images`, `negative_texts`, `weights_i2t`, `weights_t2i`. `temp` (the learned temperature, a
    /// 0-dim tensor) is clamped in place to [0.001, 0.5]; `image_ids` marks pairs that share an image.
    #[pyo3(signature = (pixel_values, input_ids, attention_mask, temp, image_ids=None, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn losses<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        temp: &Bound<'py, PyAny>,
        image_ids: Option<&Bound<'py, PyAny>>,
        seed: Option<i64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        guard("losses", || {
            let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let temp = tensor::from_py(temp, "temp")?;
            let image_ids = tensor::from_py_opt(image_ids, "image_ids")?;
            let out = self.infer(py, false, move |model| {
                let cx = ForwardContext::mode(model.training);
                model.losses(
                    &pixel_values,
                    &input_ids,
                    attention_mask.as_ref(),
                    image_ids.as_ref(),
                    &temp,
                    seed,
                    &cx,
                )
            })?;
            let d = PyDict::new(py);
            d.set_item("loss_itc", tensor::to_py(py, &out.itc)?)?;
            d.set_item("loss_itm", tensor::to_py(py, &out.itm)?)?;
            d.set_item("negative_images", tensor::to_py(py, &out.negative_images)?)?;
            d.set_item("negative_texts", tensor::to_py(py, &out.negative_texts)?)?;
            d.set_item("weights_i2t", tensor::to_py(py, &out.weights_i2t)?)?;
            d.set_item("weights_t2i", tensor::to_py(py, &out.weights_t2i)?)?;
            Ok(d)
        })
    }
});
