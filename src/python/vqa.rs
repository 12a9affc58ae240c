//! `_BlipVqaModel`: the native handle behind `blip_peft.BlipForQuestionAnswering`. The same concurrency
//! rules as `_BlipModel` (docs/ARCHITECTURE.md, "Decisions"): the model behind a mutex, read-only attributes
//! from a snapshot refreshed after every call that changes it, inference calls taking turns with the GIL
//! released, a call that finds the model busy a clear error (the one `locked` helper).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use tch::Tensor;

use super::errors::{guard, IntoPyResult};
use super::model::{locked, lora_config, parse_json, read_safetensors};
use super::{json, tensor};
use crate::blip::{BlipForQuestionAnswering, VqaInputs};
use crate::config::BlipConfig;
use crate::device::{device_name, parse_device, parse_dtype};
use crate::generate::GenerationConfig;
use crate::lora::{self, LoraConfig};
use crate::nn::ForwardContext;

type Model = BlipForQuestionAnswering;

/// A BLIP visual-question-answering model held by the Rust core. Use `blip_peft.BlipForQuestionAnswering`.
#[pyclass(module = "blip_peft._blip_peft", name = "_BlipVqaModel", frozen)]
pub struct PyBlipVqaModel {
    pub(crate) inner: Arc<Mutex<Model>>,
    /// Inference calls from different threads take turns on this, then the model.
    turn: Mutex<()>,
    snapshot: Mutex<Snapshot>,
}

/// The read-only attributes as of the last call that changed the model (the parameters are its own tensors).
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

/// `(loss or None, image_embeds, question_embeds, logits)` of a forward pass, as torch tensors.
type VqaResult<'py> = (
    Option<Bound<'py, PyAny>>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
);

impl PyBlipVqaModel {
    fn lock(&self) -> PyResult<MutexGuard<'_, Model>> {
        locked(&self.inner).py()
    }

    fn wrap(model: Model) -> Self {
        let snapshot = Snapshot::of(&model);
        Self {
            inner: Arc::new(Mutex::new(model)),
            turn: Mutex::new(()),
            snapshot: Mutex::new(snapshot),
        }
    }

    fn snapshot(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn refresh(&self, m: &Model) {
        *self.snapshot() = Snapshot::of(m);
    }

    /// Runs a call that changes the model (GIL held), then refreshes the snapshot.
    fn mutate<R>(&self, f: impl FnOnce(&mut Model) -> crate::Result<R>) -> PyResult<R> {
        let mut m = self.lock()?;
        let result = f(&mut m);
        self.refresh(&m);
        result.py()
    }

    /// Runs an inference call with the GIL released, after other threads' inference calls (its turn).
    fn infer<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Model) -> crate::Result<R> + Send,
    ) -> PyResult<R> {
        py.detach(|| {
            let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
            let m = locked(&self.inner)?;
            f(&m)
        })
        .py()
    }
}

#[pymethods]
impl PyBlipVqaModel {
    /// Loads a transformers `BlipForQuestionAnswering` folder. `dtype` is None (the stored precision),
    /// "float32", "bfloat16" or "float16"; `device` "cpu", "cuda" or "cuda:N"; `config_json` replaces the
    /// folder's `config.json` when given.
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
                .detach(|| Model::from_pretrained(&path, config, kind, device))
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

    /// Runs the model (transformers' `BlipForQuestionAnswering.forward`); returns `(loss or None,
    /// image_embeds, question_embeds, logits)` as torch tensors sharing libtorch's autograd graph.
    #[pyo3(signature = (input_ids, pixel_values, decoder_input_ids=None, decoder_attention_mask=None,
        attention_mask=None, labels=None, *, interpolate_pos_encoding=false))]
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
    ) -> PyResult<VqaResult<'py>> {
        guard("forward", || {
            let input_ids = tensor::from_py(input_ids, "input_ids")?;
            let pixel_values = tensor::from_py(pixel_values, "pixel_values")?;
            let decoder_input_ids = tensor::from_py_opt(decoder_input_ids, "decoder_input_ids")?;
            let decoder_attention_mask =
                tensor::from_py_opt(decoder_attention_mask, "decoder_attention_mask")?;
            let attention_mask = tensor::from_py_opt(attention_mask, "attention_mask")?;
            let labels = tensor::from_py_opt(labels, "labels")?;
            let out = self.infer(py, move |model| {
                let cx = ForwardContext::mode(model.training)
                    .with_interpolate_pos_encoding(interpolate_pos_encoding);
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

    /// Generates answer token ids with transformers' semantics (see
    /// `blip_peft.BlipForQuestionAnswering.generate`): `input_ids` is the question; `settings` holds the
    /// decoding keywords as the caller gave them (`GenerationConfig` reads and checks them).
    #[pyo3(signature = (pixel_values, input_ids, attention_mask=None, settings=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        settings: Option<&Bound<'py, PyDict>>,
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
            let (ids, _) = self.infer(py, move |model| {
                crate::generate::generate_answers(
                    model,
                    &pixel_values,
                    &input_ids,
                    attention_mask.as_ref(),
                    &config,
                )
            })?;
            tensor::to_py(py, &ids)
        })
    }

    /// Whether the answer decoder's LM head is its word embeddings (tied, as the config says).
    #[getter]
    fn lm_head_tied(&self) -> PyResult<bool> {
        guard("lm_head_tied", || Ok(self.lock()?.lm_head_tied()))
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

    /// What loading this model's configuration warns about, one line each.
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
            py.detach(|| {
                let m = locked(&self.inner)?;
                let result = m.to(device, kind);
                self.refresh(&m);
                result
            })
            .py()
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
            self.infer(py, move |model| model.save_pretrained(&path))
        })
    }

    // ------------------------------------------------------------------------- LoRA (as _BlipModel's)

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

    fn __repr__(&self) -> PyResult<String> {
        guard("__repr__", || Ok(self.lock()?.repr()))
    }
}
