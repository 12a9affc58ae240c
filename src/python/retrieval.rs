//! `_BlipRetrievalModel`: the native handle behind `blip_peft.BlipForImageTextRetrieval`.
//!
//! The model sits behind a mutex, as the captioner's does; every call takes it for its duration (the heavy
//! ones with the GIL released), and a call that finds it taken (another thread's call, a training run) is a
//! clear RuntimeError (busy), never a deadlock. The attributes read the model under the same lock.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use tch::Tensor;

use super::errors::{guard, IntoPyResult};
use super::model::{lora_config, parse_json, read_safetensors};
use super::tensor;
use crate::blip::retrieval::BlipForImageTextRetrieval;
use crate::blip::Record;
use crate::config::BlipConfig;
use crate::device::{device_name, parse_device, parse_dtype};
use crate::lora::{self, LoraConfig};
use crate::nn::ForwardContext;

type Model = BlipForImageTextRetrieval;

/// A BLIP image-text retrieval model held by the Rust core. Use `blip_peft.BlipForImageTextRetrieval`.
#[pyclass(module = "blip_peft._blip_peft", name = "_BlipRetrievalModel", frozen)]
pub struct PyBlipRetrievalModel {
    pub inner: Arc<Mutex<Model>>,
}

/// `(itm_score, image_embeds, question_embeds, vision hidden states or None, vision attentions or None)`.
type ForwardResult<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Vec<Bound<'py, PyAny>>>,
    Option<Vec<Bound<'py, PyAny>>>,
);

/// Locks the model; busy is an error, never a wait.
fn locked(inner: &Arc<Mutex<Model>>) -> crate::Result<MutexGuard<'_, Model>> {
    match inner.try_lock() {
        Ok(guard) => Ok(guard),
        Err(std::sync::TryLockError::WouldBlock) => Err(crate::Error::Busy(
            "the model is busy in another call (training, or another thread's call); call it after that \
             returns"
                .into(),
        )),
        Err(std::sync::TryLockError::Poisoned(_)) => Err(crate::Error::Busy(
            "the model is unusable after an internal error in an earlier call (a bug in blip_peft, reported \
             then); load the model again"
                .into(),
        )),
    }
}

impl PyBlipRetrievalModel {
    fn lock(&self) -> PyResult<MutexGuard<'_, Model>> {
        locked(&self.inner).py()
    }

    fn wrap(model: Model) -> Self {
        Self {
            inner: Arc::new(Mutex::new(model)),
        }
    }

    fn mutate<R>(&self, f: impl FnOnce(&mut Model) -> crate::Result<R>) -> PyResult<R> {
        let mut m = self.lock()?;
        f(&mut m).py()
    }

    /// Runs `f` on the model with the GIL released.
    fn detached<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Model) -> crate::Result<R> + Send,
    ) -> PyResult<R> {
        py.detach(|| {
            let mut m = locked(&self.inner)?;
            f(&mut m)
        })
        .py()
    }
}

fn list<'py>(py: Python<'py>, wanted: bool, ts: &[Tensor]) -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
    match wanted {
        true => Ok(Some(
            ts.iter().map(|t| tensor::to_py(py, t)).collect::<PyResult<_>>()?,
        )),
        false => Ok(None),
    }
}

#[pymethods]
impl PyBlipRetrievalModel {
    /// Loads a transformers `BlipForImageTextRetrieval` folder (`dtype`: None for the stored precision).
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
            let config = BlipConfig::from_json(parse_json(config_json)?).py()?;
            let kind = dtype
                .map(parse_dtype)
                .transpose()
                .py()?
                .unwrap_or(tch::Kind::Float);
            let device = parse_device(device).py()?;
            Ok(Self::wrap(Model::random(config, seed, kind, device).py()?))
        })
    }

    /// transformers' forward: `(itm_score, image_embeds, question_embeds, hidden_states, attentions)`.
    #[pyo3(signature = (pixel_values, input_ids, attention_mask=None, use_itm_head=true, *,
        output_hidden_states=false, output_attentions=false, eager=false, interpolate_pos_encoding=false))]
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
            let out = self.detached(py, move |model| {
                let cx = ForwardContext::mode(model.training)
                    .with_interpolate_pos_encoding(interpolate_pos_encoding);
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
                list(py, output_hidden_states, &out.recorded.hidden_states)?,
                list(py, output_attentions, &out.recorded.attentions)?,
            ))
        })
    }

    /// `(image features [B, image_text_hidden_size] (normalised), image embeddings [B, N, D])` of pixels.
    #[pyo3(signature = (pixel_values, interpolate_pos_encoding=false))]
    fn encode_images<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        interpolate_pos_encoding: bool,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        guard("encode_images", || {
            let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
            let (feat, embeds) = self.detached(py, move |model| {
                let cx = ForwardContext::mode(model.training)
                    .with_interpolate_pos_encoding(interpolate_pos_encoding);
                let px = model.check_pixel_values(&pixel_values, &cx)?;
                let embeds = model.encode_images(&px, &cx)?;
                Ok((model.image_features(&embeds, &cx)?, embeds))
            })?;
            Ok((tensor::to_py(py, &feat)?, tensor::to_py(py, &embeds)?))
        })
    }

    /// The normalised text features `[B, image_text_hidden_size]` (the encoder without cross-attention).
    #[pyo3(signature = (input_ids, attention_mask=None))]
    fn encode_texts<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("encode_texts", || {
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let feat = self.detached(py, move |model| {
                let cx = ForwardContext::mode(model.training);
                let (ids, mask) = model.check_text(&input_ids, attention_mask.as_ref())?;
                let hidden = model.encode_text(&ids, mask.as_ref(), None, &cx)?;
                model.text_features(&hidden, &cx)
            })?;
            tensor::to_py(py, &feat)
        })
    }

    /// The matching logits `[B, 2]` of texts over image embeddings (`encode_images`' second output), row i
    /// with row i.
    #[pyo3(signature = (image_embeds, input_ids, attention_mask=None))]
    fn itm_logits<'py>(
        &self,
        py: Python<'py>,
        image_embeds: &Bound<'py, PyAny>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("itm_logits", || {
            let image_embeds = tensor::from_py(image_embeds, "image_embeds")?;
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let logits = self.detached(py, move |model| {
                let cx = ForwardContext::mode(model.training);
                let (ids, mask) = model.check_text(&input_ids, attention_mask.as_ref())?;
                let d = model.config.vision_config.hidden_size;
                let size = image_embeds.size();
                if size.len() != 3 || size[0] != ids.size()[0] || size[2] != d {
                    return Err(crate::Error::invalid(format!(
                        "image_embeds must have shape [{}, image tokens, {d}] (one image per text), got {size:?}",
                        ids.size()[0]
                    )));
                }
                let embeds = image_embeds
                    .f_to_device(model.device())?
                    .f_to_kind(model.kind())?;
                Ok(model.itm_logits(&ids, mask.as_ref(), &embeds, &cx)?.0)
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
            let out = self.detached(py, move |model| {
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

    /// False: the retrieval head has no LM head (the base class asks).
    #[getter]
    fn lm_head_tied(&self) -> bool {
        false
    }

    /// `(path, torch class name)` of every module in `named_modules()` order (the root as "").
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

    fn config_warnings(&self) -> PyResult<Vec<String>> {
        guard("config_warnings", || Ok(self.lock()?.config.warnings()))
    }

    /// `(name, parameter)` pairs in transformers' order; the tensors are the model's own.
    fn named_parameters<'py>(&self, py: Python<'py>) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        guard("named_parameters", || {
            let params = self.lock()?.named_parameters();
            params
                .into_iter()
                .map(|(n, t)| Ok((n, tensor::to_py(py, &t)?)))
                .collect()
        })
    }

    #[pyo3(signature = (device=None, dtype=None))]
    fn to(&self, py: Python<'_>, device: Option<&str>, dtype: Option<&str>) -> PyResult<()> {
        guard("to", || {
            let device = device.map(parse_device).transpose().py()?;
            let kind = dtype.map(parse_dtype).transpose().py()?;
            self.detached(py, move |model| model.to(device, kind))
        })
    }

    #[getter]
    fn training(&self) -> PyResult<bool> {
        guard("training", || Ok(self.lock()?.training))
    }

    fn set_training(&self, mode: bool) -> PyResult<()> {
        guard("set_training", || {
            self.mutate(|m| {
                m.training = mode;
                Ok(())
            })
        })
    }

    #[getter]
    fn device(&self) -> PyResult<String> {
        guard("device", || Ok(device_name(self.lock()?.device())))
    }

    #[getter]
    fn dtype(&self) -> PyResult<&'static str> {
        guard("dtype", || Ok(crate::blip::kind_name(self.lock()?.kind())))
    }

    #[getter]
    fn name_or_path(&self) -> PyResult<String> {
        guard("name_or_path", || Ok(self.lock()?.name_or_path.clone()))
    }

    fn config_json(&self) -> PyResult<String> {
        guard("config_json", || {
            let mut config = self.lock()?.config.clone();
            config.set_raw_field("architectures", serde_json::json!(["BlipForImageTextRetrieval"]));
            Ok(config.to_json().to_string())
        })
    }

    /// Writes `config.json` and `model.safetensors` into `path`, atomically.
    fn save_pretrained(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        guard("save_pretrained", || {
            self.detached(py, move |model| model.save_pretrained(&path))
        })
    }

    fn __repr__(&self) -> PyResult<String> {
        guard("__repr__", || Ok(self.lock()?.repr()))
    }

    // ------------------------------------------------------------------------------------------ LoRA

    fn inject_lora(&self, config: &Bound<'_, PyAny>, adapter_name: &str) -> PyResult<Vec<String>> {
        guard("inject_lora", || {
            let config = lora_config(config)?;
            self.mutate(|m| lora::inject(m, &config, adapter_name))
        })
    }

    fn mark_trainable(&self, adapter_name: &str, bias: &str) -> PyResult<()> {
        guard("mark_trainable", || {
            self.mutate(|m| lora::inject::mark_trainable(m, adapter_name, bias))
        })
    }

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

    fn save_adapter(&self, dir: PathBuf, adapter_name: &str, bias: &str, config_json: &str) -> PyResult<()> {
        guard("save_adapter", || {
            lora::inject::save_adapter(&mut *self.lock()?, &dir, adapter_name, bias, config_json).py()
        })
    }

    fn load_adapter(&self, path: PathBuf, adapter_name: &str, bias: &str) -> PyResult<()> {
        guard("load_adapter", || {
            let tensors = read_safetensors(&path)?;
            self.mutate(|m| lora::inject::load_adapter_state(m, adapter_name, bias, &tensors))
        })
    }

    fn hotswap_adapter(&self, path: PathBuf, adapter_name: &str, config_json: &str) -> PyResult<()> {
        guard("hotswap_adapter", || {
            let config = LoraConfig::from_json(&parse_json(config_json)?).py()?;
            let tensors = read_safetensors(&path)?;
            self.mutate(|m| lora::inject::hotswap_adapter(m, adapter_name, &config, &tensors))
        })
    }
}
