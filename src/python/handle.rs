//! What the three native handles (`_BlipModel`, `_BlipVqaModel`, `_BlipRetrievalModel`) share, written once:
//! the model behind its mutex with the concurrency rules of docs/ARCHITECTURE.md ("Decisions"), and the
//! Python methods every head has (loading, attributes, moves, saving, LoRA), generated into each handle's one
//! `#[pymethods]` block by [`head_handle!`].
//!
//! Read-only attributes (`device`, `dtype`, `config_json`, `name_or_path`, `training`, `named_parameters`)
//! come from a snapshot taken after every call that changes the model, so they never wait for, or fail
//! because of, another thread's call. Inference calls from different threads take turns (the second waits,
//! with the GIL released); a call that would change the model while another one runs, or any call while
//! training runs in another thread, is a clear `RuntimeError` (busy), never a deadlock. A training callback
//! may call `generate` on the model being trained: the trainer lends it the weights for the callback's
//! duration ([`Lend`]).

use std::cell::Cell;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use tch::{Device, Kind, Tensor};

use super::errors::IntoPyResult;
use crate::config::BlipConfig;
use crate::device::device_name;
use crate::lora::LoraHost;

/// What a handle needs of its head beyond [`LoraHost`] (each head's methods of the same names).
pub trait HeadModel: LoraHost + Send + Sized + 'static {
    fn load(
        path: &Path,
        config: Option<BlipConfig>,
        kind: Option<Kind>,
        device: Device,
    ) -> crate::Result<Self>;
    fn random(config: BlipConfig, seed: i64, kind: Kind, device: Device) -> crate::Result<Self>;
    fn config(&self) -> &BlipConfig;
    /// `config_json()`: the configuration as transformers writes it for this head.
    fn config_json(&self) -> String {
        self.config().to_json().to_string()
    }
    fn kind(&self) -> Kind;
    fn name_or_path(&self) -> &str;
    fn training(&self) -> bool;
    fn set_training(&mut self, mode: bool);
    fn to(&self, device: Option<Device>, kind: Option<Kind>) -> crate::Result<()>;
    fn save_pretrained(&self, dir: &Path) -> crate::Result<()>;
    fn repr(&self) -> String;
    /// Whether the LM head is the word embeddings (false for a head without one).
    fn lm_head_tied(&self) -> bool;
}

macro_rules! head_model {
    ($ty:ty, load: $load:ident, config_json: |$c:ident| $config_json:expr, lm_head_tied: |$m:ident| $tied:expr) => {
        impl HeadModel for $ty {
            fn load(
                path: &Path,
                config: Option<BlipConfig>,
                kind: Option<Kind>,
                device: Device,
            ) -> crate::Result<Self> {
                <$ty>::$load(path, config, kind, device)
            }
            fn random(config: BlipConfig, seed: i64, kind: Kind, device: Device) -> crate::Result<Self> {
                <$ty>::random(config, seed, kind, device)
            }
            fn config(&self) -> &BlipConfig {
                &self.config
            }
            fn config_json(&self) -> String {
                let $c = self.config.clone();
                $config_json
            }
            fn kind(&self) -> Kind {
                <$ty>::kind(self)
            }
            fn name_or_path(&self) -> &str {
                &self.name_or_path
            }
            fn training(&self) -> bool {
                self.training
            }
            fn set_training(&mut self, mode: bool) {
                self.training = mode;
            }
            fn to(&self, device: Option<Device>, kind: Option<Kind>) -> crate::Result<()> {
                <$ty>::to(self, device, kind)
            }
            fn save_pretrained(&self, dir: &Path) -> crate::Result<()> {
                <$ty>::save_pretrained(self, dir)
            }
            fn repr(&self) -> String {
                <$ty>::repr(self)
            }
            fn lm_head_tied(&self) -> bool {
                let $m = self;
                $tied
            }
        }
    };
}

head_model!(crate::blip::BlipForConditionalGeneration, load: from_pretrained_with,
    config_json: |c| c.to_json().to_string(),
    lm_head_tied: |m| m.text_decoder.cls.predictions.decoder.tied);
head_model!(crate::blip::BlipForQuestionAnswering, load: from_pretrained,
    config_json: |c| c.to_json().to_string(),
    lm_head_tied: |m| m.lm_head_tied());
head_model!(crate::blip::retrieval::BlipForImageTextRetrieval, load: from_pretrained_with,
    config_json: |c| {
        let mut c = c;
        c.set_raw_field("architectures", serde_json::json!(["BlipForImageTextRetrieval"]));
        c.to_json().to_string()
    },
    lm_head_tied: |_m| false);

/// The model's read-only attributes as of the last call that changed it. The parameters are the model's
/// own tensors (the same `at::Tensor`s, so Python sees the very parameters), only the list is a copy.
pub struct Snapshot {
    pub device: String,
    pub dtype: &'static str,
    pub name_or_path: String,
    pub config_json: String,
    pub training: bool,
    pub params: Vec<(String, Tensor)>,
}

impl Snapshot {
    fn of<M: HeadModel>(m: &M) -> Self {
        Self {
            device: device_name(LoraHost::device(m)),
            dtype: crate::blip::kind_name(m.kind()),
            name_or_path: m.name_or_path().to_string(),
            config_json: m.config_json(),
            training: m.training(),
            params: LoraHost::named_parameters(m),
        }
    }
}

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
/// this thread (keyed by the handle's own mutex, so it is only ever read back as the same type), and only
/// read-only calls use it.
pub struct Lend(Option<(usize, usize)>);

impl Lend {
    pub fn new<M>(inner: &Arc<Mutex<M>>, model: &M) -> Self {
        let key = Arc::as_ptr(inner) as usize;
        Self(LENT.with(|l| l.replace(Some((key, model as *const M as usize)))))
    }
}

impl Drop for Lend {
    fn drop(&mut self) {
        LENT.with(|l| l.set(self.0));
    }
}

/// The address of the model lent to this thread for `inner`, if any.
fn lent<M>(inner: &Arc<Mutex<M>>) -> Option<usize> {
    let key = Arc::as_ptr(inner) as usize;
    LENT.with(|l| l.get()).and_then(|(k, m)| (k == key).then_some(m))
}

/// A head behind its mutex, with the snapshot of its attributes and the inference calls' turn.
pub struct Handle<M> {
    pub inner: Arc<Mutex<M>>,
    /// Inference calls from different threads take turns on this, then the model.
    turn: Mutex<()>,
    /// What the read-only attributes report, read without the model's lock.
    snapshot: Mutex<Snapshot>,
}

impl<M: HeadModel> Handle<M> {
    pub fn new(model: M) -> Self {
        let snapshot = Snapshot::of(&model);
        Self {
            inner: Arc::new(Mutex::new(model)),
            turn: Mutex::new(()),
            snapshot: Mutex::new(snapshot),
        }
    }

    /// Locks the model for a call made with the GIL held (see [`locked`]).
    pub fn lock(&self) -> PyResult<MutexGuard<'_, M>> {
        locked(&self.inner).py()
    }

    /// Takes a new snapshot of the read-only attributes (after a call that may have changed the model).
    pub fn refresh(&self, m: &M) {
        let fresh = Snapshot::of(m);
        *self.snapshot() = fresh;
    }

    pub fn snapshot(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a call that changes the model (GIL held), then refreshes the snapshot.
    pub fn mutate<R>(&self, f: impl FnOnce(&mut M) -> crate::Result<R>) -> PyResult<R> {
        let mut m = self.lock()?;
        let result = f(&mut m);
        self.refresh(&m);
        result.py()
    }

    /// Runs a call that changes the model with the GIL released, then refreshes the snapshot.
    pub fn mutate_detached<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut M) -> crate::Result<R> + Send,
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
    pub fn infer<R: Send>(
        &self,
        py: Python<'_>,
        lendable: bool,
        f: impl FnOnce(&M) -> crate::Result<R> + Send,
    ) -> PyResult<R> {
        let lent = if lendable { lent(&self.inner) } else { None };
        py.detach(|| {
            if let Some(addr) = lent {
                // SAFETY: see `Lend`: the trainer on this very thread holds the model borrowed shared until
                // the callback running this call returns; the key is this handle's mutex, which holds an `M`.
                return f(unsafe { &*(addr as *const M) });
            }
            let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
            let m = locked(&self.inner)?;
            f(&m)
        })
        .py()
    }
}

/// `wanted` tensors as a list of torch tensors, else None (the recorded hidden states / attentions).
pub fn tensor_list<'py>(
    py: Python<'py>,
    wanted: bool,
    ts: &[Tensor],
) -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
    match wanted {
        true => Ok(Some(
            ts.iter()
                .map(|t| super::tensor::to_py(py, t))
                .collect::<PyResult<_>>()?,
        )),
        false => Ok(None),
    }
}

/// A handle's one `#[pymethods]` block: its own methods (`{ ... }`) and the methods every head has. The
/// handle type must deref to [`Handle`] of `$model` and have `fn wrap($model) -> Self`.
macro_rules! head_handle {
    ($ty:ty, $model:ty, { $($own:tt)* }) => {
        #[::pyo3::pymethods]
        impl $ty {
            $($own)*

            /// Loads a transformers checkpoint folder of this head. `dtype` is None (the stored precision),
            /// "float32", "bfloat16" or "float16"; `device` is "cpu", "cuda" or "cuda:N". `config_json`, when
            /// given, replaces the folder's `config.json` (transformers' `config=`).
            #[staticmethod]
            #[pyo3(signature = (path, dtype=None, device="cpu", config_json=None))]
            fn from_pretrained(
                py: ::pyo3::Python<'_>,
                path: ::std::path::PathBuf,
                dtype: Option<&str>,
                device: &str,
                config_json: Option<&str>,
            ) -> ::pyo3::PyResult<Self> {
                use $crate::python::errors::IntoPyResult;
                $crate::python::errors::guard("from_pretrained", || {
                    let kind = dtype.map($crate::device::parse_dtype).transpose().py()?;
                    let device = $crate::device::parse_device(device).py()?;
                    let config = match config_json {
                        Some(text) => Some(
                            $crate::config::BlipConfig::from_json($crate::python::model::parse_json(text)?).py()?,
                        ),
                        None => None,
                    };
                    let model = py
                        .detach(|| {
                            <$model as $crate::python::handle::HeadModel>::load(&path, config, kind, device)
                        })
                        .py()?;
                    Ok(Self::wrap(model))
                })
            }

            /// A freshly initialised model from a `config.json` document (a JSON string), seeded.
            #[staticmethod]
            #[pyo3(signature = (config_json, seed=0, dtype=None, device="cpu"))]
            fn from_config(config_json: &str, seed: i64, dtype: Option<&str>, device: &str) -> ::pyo3::PyResult<Self> {
                use $crate::python::errors::IntoPyResult;
                $crate::python::errors::guard("from_config", || {
                    let raw = $crate::python::model::parse_json(config_json)?;
                    let config = $crate::config::BlipConfig::from_json(raw).py()?;
                    let kind = dtype
                        .map($crate::device::parse_dtype)
                        .transpose()
                        .py()?
                        .unwrap_or(tch::Kind::Float);
                    let device = $crate::device::parse_device(device).py()?;
                    let model = <$model as $crate::python::handle::HeadModel>::random(config, seed, kind, device).py()?;
                    Ok(Self::wrap(model))
                })
            }

            /// Whether the LM head's decoder is the word embeddings (tied, as the config says); false for a
            /// head without an LM head.
            #[getter]
            fn lm_head_tied(&self) -> ::pyo3::PyResult<bool> {
                $crate::python::errors::guard("lm_head_tied", || {
                    Ok($crate::python::handle::HeadModel::lm_head_tied(&*self.lock()?))
                })
            }

            /// `(path, torch class name)` of every module in `named_modules()` order (the root as ""), as
            /// `print(model)` shows the tree (peft's wrappers included).
            fn module_tree(&self) -> ::pyo3::PyResult<Vec<(String, String)>> {
                fn walk(node: &$crate::repr::ReprNode, path: &str, out: &mut Vec<(String, String)>) {
                    out.push((path.to_string(), node.type_name.clone()));
                    for (name, child) in &node.children {
                        walk(child, &$crate::nn::join(path, name), out);
                    }
                }
                let mut out = Vec::new();
                $crate::python::errors::guard("module_tree", || {
                    walk(&$crate::lora::LoraHost::repr_node(&*self.lock()?), "", &mut out);
                    Ok(out)
                })
            }

            /// What loading this model's configuration warns about (transformers logs the same), one line each.
            fn config_warnings(&self) -> ::pyo3::PyResult<Vec<String>> {
                $crate::python::errors::guard("config_warnings", || {
                    Ok($crate::python::handle::HeadModel::config(&*self.lock()?).warnings())
                })
            }

            /// `(name, parameter)` pairs in transformers' order; the tensors are the model's own.
            fn named_parameters<'py>(
                &self,
                py: ::pyo3::Python<'py>,
            ) -> ::pyo3::PyResult<Vec<(String, ::pyo3::Bound<'py, ::pyo3::PyAny>)>> {
                $crate::python::errors::guard("named_parameters", || {
                    let params: Vec<(String, tch::Tensor)> = self
                        .snapshot()
                        .params
                        .iter()
                        .map(|(n, t)| (n.clone(), t.shallow_clone()))
                        .collect();
                    params
                        .into_iter()
                        .map(|(n, t)| Ok((n, $crate::python::tensor::to_py(py, &t)?)))
                        .collect()
                })
            }

            /// Moves parameters in place to `device` and/or casts floating ones to `dtype`.
            #[pyo3(signature = (device=None, dtype=None))]
            fn to(&self, py: ::pyo3::Python<'_>, device: Option<&str>, dtype: Option<&str>) -> ::pyo3::PyResult<()> {
                use $crate::python::errors::IntoPyResult;
                $crate::python::errors::guard("to", || {
                    let device = device.map($crate::device::parse_device).transpose().py()?;
                    let kind = dtype.map($crate::device::parse_dtype).transpose().py()?;
                    self.mutate_detached(py, move |m| $crate::python::handle::HeadModel::to(&*m, device, kind))
                })
            }

            #[getter]
            fn training(&self) -> ::pyo3::PyResult<bool> {
                $crate::python::errors::guard("training", || Ok(self.snapshot().training))
            }

            fn set_training(&self, mode: bool) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("set_training", || {
                    self.mutate(|m| {
                        $crate::python::handle::HeadModel::set_training(m, mode);
                        Ok(())
                    })
                })
            }

            /// The device as torch spells it ("cpu", "cuda:0").
            #[getter]
            fn device(&self) -> ::pyo3::PyResult<String> {
                $crate::python::errors::guard("device", || Ok(self.snapshot().device.clone()))
            }

            /// The weights' dtype name ("float32", "bfloat16", "float16").
            #[getter]
            fn dtype(&self) -> ::pyo3::PyResult<&'static str> {
                $crate::python::errors::guard("dtype", || Ok(self.snapshot().dtype))
            }

            #[getter]
            fn name_or_path(&self) -> ::pyo3::PyResult<String> {
                $crate::python::errors::guard("name_or_path", || Ok(self.snapshot().name_or_path.clone()))
            }

            /// The configuration as a JSON string (transformers' `config.json` layout).
            fn config_json(&self) -> ::pyo3::PyResult<String> {
                $crate::python::errors::guard("config_json", || Ok(self.snapshot().config_json.clone()))
            }

            /// Writes `config.json` and `model.safetensors` into `path` (created if needed), atomically.
            fn save_pretrained(&self, py: ::pyo3::Python<'_>, path: ::std::path::PathBuf) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("save_pretrained", || {
                    self.infer(py, true, move |m| $crate::python::handle::HeadModel::save_pretrained(m, &path))
                })
            }

            fn __repr__(&self) -> ::pyo3::PyResult<String> {
                $crate::python::errors::guard("__repr__", || {
                    Ok($crate::python::handle::HeadModel::repr(&*self.lock()?))
                })
            }

            // -------------------------------------------------------------------------------------- LoRA

            /// Injects adapter `adapter_name` per a LoRA config (peft's adapter_config.json fields, as a dict
            /// or JSON text); returns the paths of the layers that got it.
            fn inject_lora(
                &self,
                config: &::pyo3::Bound<'_, ::pyo3::PyAny>,
                adapter_name: &str,
            ) -> ::pyo3::PyResult<Vec<String>> {
                $crate::python::errors::guard("inject_lora", || {
                    let config = $crate::python::model::lora_config(config)?;
                    self.mutate(|m| $crate::lora::inject(m, &config, adapter_name))
                })
            }

            /// Freezes the base and makes `adapter_name` (and the biases of `bias` mode) trainable.
            fn mark_trainable(&self, adapter_name: &str, bias: &str) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("mark_trainable", || {
                    self.mutate(|m| $crate::lora::inject::mark_trainable(m, adapter_name, bias))
                })
            }

            /// `(path, layer type, in, out)` of every layer LoRA can target.
            fn lora_targets(&self) -> ::pyo3::PyResult<Vec<(String, String, i64, i64)>> {
                use $crate::python::errors::IntoPyResult;
                $crate::python::errors::guard("lora_targets", || {
                    let targets = $crate::lora::inject::targetable_layers(&mut *self.lock()?).py()?;
                    Ok(targets
                        .into_iter()
                        .map(|t| (t.path, t.layer_type.to_string(), t.in_features, t.out_features))
                        .collect())
                })
            }

            fn set_active_adapter(&self, adapter_name: &str) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("set_active_adapter", || {
                    self.mutate(|m| $crate::lora::inject::set_active(m, adapter_name))
                })
            }

            fn merge_adapters(&self) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("merge_adapters", || self.mutate($crate::lora::inject::merge))
            }

            fn unmerge_adapters(&self) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("unmerge_adapters", || self.mutate($crate::lora::inject::unmerge))
            }

            fn set_adapters_disabled(&self, disabled: bool) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("set_adapters_disabled", || {
                    self.mutate(|m| $crate::lora::inject::set_disabled(m, disabled))
                })
            }

            /// Removes every adapter, merging the active ones first when `merge`.
            fn unload_adapters(&self, merge: bool) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("unload_adapters", || {
                    self.mutate(|m| $crate::lora::inject::unload(m, merge))
                })
            }

            fn delete_adapter(&self, adapter_name: &str) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("delete_adapter", || {
                    self.mutate(|m| $crate::lora::inject::delete(m, adapter_name))
                })
            }

            fn adapter_names(&self) -> ::pyo3::PyResult<Vec<String>> {
                use $crate::python::errors::IntoPyResult;
                $crate::python::errors::guard("adapter_names", || {
                    $crate::lora::inject::adapter_names(&mut *self.lock()?).py()
                })
            }

            /// `(peft file key, tensor)` pairs of an adapter, as peft saves them.
            fn adapter_state<'py>(
                &self,
                py: ::pyo3::Python<'py>,
                adapter_name: &str,
                bias: &str,
            ) -> ::pyo3::PyResult<Vec<(String, ::pyo3::Bound<'py, ::pyo3::PyAny>)>> {
                use $crate::python::errors::IntoPyResult;
                $crate::python::errors::guard("adapter_state", || {
                    let state =
                        $crate::lora::inject::adapter_state(&mut *self.lock()?, adapter_name, bias).py()?;
                    state
                        .into_iter()
                        .map(|(k, t)| Ok((k, $crate::python::tensor::to_py(py, &t)?)))
                        .collect()
                })
            }

            /// Writes peft's adapter folder for `adapter_name` (`config_json`: its adapter_config.json text).
            fn save_adapter(
                &self,
                dir: ::std::path::PathBuf,
                adapter_name: &str,
                bias: &str,
                config_json: &str,
            ) -> ::pyo3::PyResult<()> {
                use $crate::python::errors::IntoPyResult;
                $crate::python::errors::guard("save_adapter", || {
                    $crate::lora::inject::save_adapter(&mut *self.lock()?, &dir, adapter_name, bias, config_json)
                        .py()
                })
            }

            /// Loads an adapter file (safetensors) into the injected adapter `adapter_name`; every key must fit.
            fn load_adapter(&self, path: ::std::path::PathBuf, adapter_name: &str, bias: &str) -> ::pyo3::PyResult<()> {
                $crate::python::errors::guard("load_adapter", || {
                    let tensors = $crate::python::model::read_safetensors(&path)?;
                    self.mutate(|m| $crate::lora::inject::load_adapter_state(m, adapter_name, bias, &tensors))
                })
            }

            /// Replaces adapter `adapter_name`'s weights in place by an adapter file made for the same layers
            /// and ranks (`config_json`: its adapter_config.json), on the live model.
            fn hotswap_adapter(
                &self,
                path: ::std::path::PathBuf,
                adapter_name: &str,
                config_json: &str,
            ) -> ::pyo3::PyResult<()> {
                use $crate::python::errors::IntoPyResult;
                $crate::python::errors::guard("hotswap_adapter", || {
                    let raw = $crate::python::model::parse_json(config_json)?;
                    let config = $crate::lora::LoraConfig::from_json(&raw).py()?;
                    let tensors = $crate::python::model::read_safetensors(&path)?;
                    self.mutate(|m| $crate::lora::inject::hotswap_adapter(m, adapter_name, &config, &tensors))
                })
            }
        }

        impl ::std::ops::Deref for $ty {
            type Target = $crate::python::handle::Handle<$model>;
            fn deref(&self) -> &Self::Target {
                &self.handle
            }
        }
    };
}
pub(crate) use head_handle;
