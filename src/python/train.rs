//! `train_native`: runs the core trainer with the GIL released, calling back into Python at logging steps
//! (progress, the user's callback, Ctrl-C).

use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::errors::{guard, IntoPyResult};
use super::model::{locked, PyBlipModel};
use super::retrieval::PyBlipRetrievalModel;
use super::vqa::PyBlipVqaModel;
use super::{json, tensor};
use crate::blip::BlipForConditionalGeneration;
use crate::data::{BatchSource, ImageCaptionSource, TensorDataset, Texts};
use crate::processor::augment::AugmentConfig;
use crate::train::checkpoint::WeightsFormat;
use crate::train::trainer::{Collective, Control, EvalRecord, Metrics, Observer, TrainConfig, TrainOutcome};
use crate::train::{RetrievalTask, StepLog, TrainTask, Trainer};

/// Calls the Python callback at logging steps; Ctrl-C and a callback returning True stop training.
struct PyObserver {
    /// The handle of the captioner being trained: lent to the callback (see `model::Lend`). The other heads
    /// are not lent (a callback's call on them finds the model busy).
    inner: Option<std::sync::Arc<std::sync::Mutex<BlipForConditionalGeneration>>>,
    callback: Option<Py<PyAny>>,
    /// `scorer(step) -> dict[str, float]`: the evaluation metrics besides the loss (caption scores).
    scorer: Option<Py<PyAny>>,
    /// Set by `blip_peft.training._ctrl_c_noted`'s SIGINT handler: a Ctrl-C whose KeyboardInterrupt Python
    /// code may have swallowed.
    ctrl_c: Option<Py<PyAny>>,
    interrupted: bool,
    error: Option<PyErr>,
}

impl PyObserver {
    /// The one interrupt check: Ctrl-C stops training after the step (`Stop`); another exception raised by a
    /// signal handler is kept to be re-raised once `train` returns.
    fn check_signals(&mut self, py: Python<'_>) -> crate::Result<Control> {
        if let Err(e) = py.check_signals() {
            return self.stop_for(py, e, "a Python signal handler raised an exception");
        }
        let noted = match &self.ctrl_c {
            Some(event) => event
                .call_method0(py, "is_set")
                .and_then(|r| r.bind(py).is_truthy()),
            None => Ok(false),
        };
        match noted {
            Ok(true) => {
                self.interrupted = true;
                Ok(Control::Stop)
            }
            Ok(false) => Ok(Control::Continue),
            Err(e) => self.stop_for(py, e, "checking for Ctrl-C raised an exception"),
        }
    }

    /// What a Python exception means for the loop: Ctrl-C stops it cleanly; anything else is kept for the
    /// caller and ends training with a [`crate::Error::Callback`] saying where it came from.
    fn stop_for(&mut self, py: Python<'_>, e: PyErr, source: &str) -> crate::Result<Control> {
        if e.is_instance_of::<PyKeyboardInterrupt>(py) {
            self.interrupted = true;
            return Ok(Control::Stop);
        }
        self.error = Some(e);
        Err(crate::Error::Callback(source.to_string()))
    }

    fn call(
        &mut self,
        model: Option<&BlipForConditionalGeneration>,
        event: &str,
        payload: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>,
    ) -> crate::Result<Control> {
        Python::attach(|py| {
            if self.check_signals(py)? == Control::Stop {
                return Ok(Control::Stop);
            }
            let Some(cb) = &self.callback else {
                return Ok(Control::Continue);
            };
            // The callback may generate with the model being trained (sample captions during training).
            let _lend = self.lend(model);
            let result = payload(py).and_then(|p| cb.call1(py, (event, p)));
            match result {
                Ok(r) => Ok(if r.bind(py).is_truthy().unwrap_or(false) {
                    Control::Stop
                } else {
                    Control::Continue
                }),
                Err(e) => self.stop_for(py, e, "the training callback raised an exception"),
            }
        })
    }
}

impl PyObserver {
    /// Lends the captioner being trained to this thread's calls while the guard lives.
    fn lend(&self, model: Option<&BlipForConditionalGeneration>) -> Option<super::model::Lend> {
        match (&self.inner, model) {
            (Some(inner), Some(model)) => Some(super::model::Lend::new(inner, model)),
            _ => None,
        }
    }

    /// The scorer's metrics for the model at `step`, the model lent to it as to the callback.
    fn scores(
        &mut self,
        model: Option<&BlipForConditionalGeneration>,
        step: i64,
    ) -> crate::Result<Option<Metrics>> {
        Python::attach(|py| {
            let Some(scorer) = &self.scorer else {
                return Ok(Some(Metrics::default()));
            };
            let _lend = self.lend(model);
            let result = scorer.call1(py, (step,)).and_then(|r| {
                let d = r.bind(py).cast::<PyDict>().map_err(PyErr::from)?.clone();
                d.iter()
                    .map(|(k, v)| Ok((k.extract::<String>()?, v.extract::<f64>()?)))
                    .collect::<PyResult<Vec<_>>>()
            });
            match result {
                Ok(m) => Ok(Some(Metrics(m))),
                Err(e) => {
                    // Ctrl-C while scoring: no scores for this step, and the run stops after it.
                    self.stop_for(py, e, "the evaluation's caption scoring raised an exception")?;
                    Ok(None)
                }
            }
        })
    }
}

fn log_dict<'py>(py: Python<'py>, log: &StepLog) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("step", log.step)?;
    d.set_item("epoch", log.epoch)?;
    d.set_item("loss", log.loss)?;
    d.set_item("learning_rate", log.learning_rate)?;
    d.set_item("grad_norm", log.grad_norm)?;
    d.set_item("samples_per_second", log.samples_per_second)?;
    d.set_item("skipped", log.skipped)?;
    Ok(d)
}

impl<T: TrainTask> Observer<T> for PyObserver {
    fn on_log(&mut self, model: &T, logs: &[StepLog], total_steps: i64) -> crate::Result<Control> {
        self.call(model.as_captioner(), "log", |py| {
            let list = PyList::empty(py);
            for l in logs {
                list.append(log_dict(py, l)?)?;
            }
            let d = PyDict::new(py);
            d.set_item("logs", list)?;
            d.set_item("total_steps", total_steps)?;
            Ok(d.into_any().unbind())
        })
    }

    fn on_step_end(&mut self) -> crate::Result<Control> {
        Python::attach(|py| self.check_signals(py))
    }

    fn on_eval(&mut self, model: &T, step: i64, metrics: &Metrics) -> crate::Result<Control> {
        self.call(model.as_captioner(), "eval", |py| {
            let d = PyDict::new(py);
            d.set_item("step", step)?;
            for (name, value) in &metrics.0 {
                d.set_item(name, value)?;
            }
            Ok(d.into_any().unbind())
        })
    }

    fn score(&mut self, model: &T, step: i64) -> crate::Result<Option<Metrics>> {
        self.scores(model.as_captioner(), step)
    }
}

/// `torch.distributed` collectives, called through the Python helper object `blip_peft.distributed._Collective`.
struct PyCollective {
    handle: Py<PyAny>,
    error: Option<PyErr>,
}

impl PyCollective {
    fn call<T>(&mut self, f: impl FnOnce(Python<'_>, &Bound<'_, PyAny>) -> PyResult<T>) -> crate::Result<T> {
        Python::attach(|py| match f(py, self.handle.bind(py)) {
            Ok(v) => Ok(v),
            Err(e) => {
                let msg = format!("a distributed collective failed: {e}");
                self.error = Some(e);
                Err(crate::Error::Callback(msg))
            }
        })
    }
}

impl Collective for PyCollective {
    fn all_reduce_mean(&mut self, t: &tch::Tensor) -> crate::Result<()> {
        self.call(|py, h| {
            h.call_method1("all_reduce_mean", (tensor::to_py(py, t)?,))?;
            Ok(())
        })
    }

    fn all_reduce_max(&mut self, value: f64) -> crate::Result<f64> {
        self.call(|_, h| h.call_method1("all_reduce_max", (value,))?.extract::<f64>())
    }

    fn all_equal(&mut self, value: f64) -> crate::Result<bool> {
        self.call(|_, h| h.call_method1("all_equal", (value,))?.extract::<bool>())
    }
}

/// Images (paths, bytes, arrays or PIL pixels), tokenised captions and the native image processor, built by
/// `blip_peft.train` and consumed by `train_native`: images are decoded batch by batch on Rust threads.
#[pyclass(module = "blip_peft._blip_peft", name = "_ImageCaptionData")]
pub struct PyImageCaptionData {
    source: Option<ImageCaptionSource>,
    skipped: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<usize>>>,
}

#[pymethods]
impl PyImageCaptionData {
    #[new]
    #[pyo3(signature = (
        image_processor, images, captions, bos_token_id, pad_token_id, max_length=None, skip_bad=false,
        num_workers=None, prompt_tokens=0, augment=None, texts=None, questions=None, image_ids=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        image_processor: PyRef<'_, super::processor::PyImageProcessor>,
        images: &Bound<'_, PyList>,
        captions: Vec<Vec<i64>>,
        bos_token_id: i64,
        pad_token_id: i64,
        max_length: Option<&Bound<'_, PyAny>>,
        skip_bad: bool,
        num_workers: Option<&Bound<'_, PyAny>>,
        prompt_tokens: usize,
        augment: Option<&Bound<'_, PyDict>>,
        texts: Option<Vec<String>>,
        questions: Option<Vec<Vec<i64>>>,
        image_ids: Option<Vec<i64>>,
    ) -> PyResult<Self> {
        guard("_ImageCaptionData()", || {
            let max_length = crate::data::check_max_length(json::int_arg(max_length, "max_length")?).py()?;
            let num_workers = match json::int_arg(num_workers, "num_workers")? {
                Some(n) if n < 1 => {
                    return Err(PyValueError::new_err(format!(
                        "num_workers must be a positive int (threads decoding images), got {n}"
                    )))
                }
                n => n.map(|n| n as usize),
            };
            let sources = images
                .iter()
                .enumerate()
                .map(|(i, obj)| super::processor::to_source(i, &obj))
                .collect::<PyResult<Vec<_>>>()?;
            let mut source = ImageCaptionSource::new(
                image_processor.config().clone(),
                sources,
                captions,
                bos_token_id,
                pad_token_id,
                max_length,
                skip_bad,
            )
            .py()?;
            source.prompt_tokens = prompt_tokens;
            source = match (questions, image_ids) {
                (None, None) => source,
                (Some(q), None) => source.with_texts(Texts::Questions(q)).py()?,
                (None, Some(ids)) => source.with_texts(Texts::ImageIds(ids)).py()?,
                (Some(_), Some(_)) => {
                    return Err(PyValueError::new_err(
                        "questions (VQA) and image_ids (retrieval) are for different heads; give one",
                    ))
                }
            };
            if let Some(augment) = augment {
                let config = AugmentConfig::from_keywords(json::from_dict(augment)?).py()?;
                let texts = texts.ok_or_else(|| {
                    PyValueError::new_err("augment needs the captions' texts (texts=) to keep sides right")
                })?;
                source = source.with_augment(config, &texts).py()?;
            }
            let source = match num_workers {
                Some(n) => source.with_workers(n).py()?,
                None => source,
            };
            let skipped = source.skipped.clone();
            Ok(Self {
                source: Some(source),
                skipped,
            })
        })
    }

    fn __len__(&self) -> usize {
        self.source.as_ref().map_or(0, |s| s.images.len())
    }

    /// The batch of `indices` as training builds it: augmented for (`seed`, `epoch`) when the data has
    /// augmentation and `epoch` is given, the plain preprocessing otherwise. For tests and inspection.
    #[pyo3(signature = (indices, epoch=None, seed=0))]
    fn batch<'py>(
        &self,
        py: Python<'py>,
        indices: Vec<usize>,
        epoch: Option<i64>,
        seed: i64,
    ) -> PyResult<Bound<'py, PyDict>> {
        guard("_ImageCaptionData.batch()", || {
            let source = self
                .source
                .as_ref()
                .ok_or_else(|| PyValueError::new_err("this data was already used by a training run"))?;
            let batch = py
                .detach(|| match epoch {
                    Some(e) => source.train_batch(&indices, e, seed),
                    None => source.batch(&indices),
                })
                .py()?;
            let out = PyDict::new(py);
            out.set_item("pixel_values", tensor::to_py(py, &batch.pixel_values)?)?;
            out.set_item("input_ids", tensor::to_py(py, &batch.input_ids)?)?;
            out.set_item("attention_mask", tensor::to_py(py, &batch.attention_mask)?)?;
            out.set_item("labels", tensor::to_py(py, &batch.labels)?)?;
            for (name, t) in [
                ("decoder_input_ids", &batch.decoder_input_ids),
                ("decoder_attention_mask", &batch.decoder_attention_mask),
                ("image_ids", &batch.image_ids),
            ] {
                if let Some(t) = t {
                    out.set_item(name, tensor::to_py(py, t)?)?;
                }
            }
            Ok(out)
        })
    }

    /// Indices of the items skipped as unreadable so far.
    fn skipped(&self) -> Vec<usize> {
        self.skipped
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// A training or evaluation source from what Python passed: `_ImageCaptionData` or a mapping of tensors.
fn batch_source(obj: &Bound<'_, PyAny>, what: &str, bos: i64) -> PyResult<Box<dyn BatchSource>> {
    if let Ok(data) = obj.cast::<PyImageCaptionData>() {
        let mut data = data.borrow_mut();
        let source = data.source.take().ok_or_else(|| {
            PyValueError::new_err(format!(
                "{what} was already used by a training run; build it again"
            ))
        })?;
        return Ok(Box::new(source));
    }
    Ok(Box::new(tensor_dataset(obj, what, bos)?))
}

fn tensor_dataset(parts: &Bound<'_, PyAny>, what: &str, bos: i64) -> PyResult<TensorDataset> {
    let get = |k: &str| -> PyResult<Option<tch::Tensor>> {
        match parts.get_item(k) {
            Ok(v) if !v.is_none() => Ok(Some(tensor::from_py(&v, &format!("{what}[{k:?}]"))?)),
            _ => Ok(None),
        }
    };
    let pixel_values =
        get("pixel_values")?.ok_or_else(|| PyValueError::new_err(format!("{what} has no pixel_values")))?;
    let input_ids =
        get("input_ids")?.ok_or_else(|| PyValueError::new_err(format!("{what} has no input_ids")))?;
    TensorDataset::new(
        pixel_values,
        input_ids,
        get("attention_mask")?,
        get("labels")?,
        bos,
    )
    .py()
}

/// The model handle `train_native` was given: one of the three heads.
enum Head<'a, 'py> {
    Caption(PyRef<'py, PyBlipModel>),
    Vqa(PyRef<'py, PyBlipVqaModel>),
    Retrieval(PyRef<'py, PyBlipRetrievalModel>, &'a Bound<'py, PyAny>),
}

/// Runs the trainer on one head with the GIL released (the run's references gathered in one place).
struct Run<'a> {
    train: Box<dyn BatchSource>,
    eval: Option<Box<dyn BatchSource>>,
    config: &'a TrainConfig,
    adapter: &'a Option<(String, String, String)>,
    observer: &'a mut PyObserver,
    collective: Option<&'a mut PyCollective>,
}

impl Run<'_> {
    fn go<T: TrainTask>(self, model: &mut T) -> crate::Result<TrainOutcome> {
        let format = match self.adapter {
            Some((name, bias, config_json)) => WeightsFormat::Adapter {
                name,
                bias,
                config_json,
            },
            None => WeightsFormat::Full,
        };
        let collective = self.collective.map(|c| c as &mut dyn Collective);
        Trainer::run(
            model,
            self.train,
            self.eval,
            self.config,
            &format,
            self.observer,
            collective,
        )
    }
}

/// Trains `model` (the native handle of any BLIP head) on a dataset source (`_ImageCaptionData`, or for the
/// captioner a mapping of encoded tensors: pixel_values, input_ids, attention_mask, labels). `adapter` is
/// `(name, bias, adapter_config_json)` for a PeftModel, None for full fine-tuning. `temp`: the retrieval
/// head's temperature (a 0-dim float32 tensor, trained in place when it requires grad). `ctrl_c`: an event
/// (`is_set()`) that stops training after the step once set.
#[pyfunction]
#[pyo3(signature = (model, train, eval, settings, adapter=None, callback=None, distributed=None, scorer=None, temp=None, ctrl_c=None))]
#[allow(clippy::too_many_arguments)]
pub fn train_native<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    train: &Bound<'py, PyAny>,
    eval: Option<&Bound<'py, PyAny>>,
    settings: &Bound<'py, PyDict>,
    adapter: Option<(String, String, String)>,
    callback: Option<Py<PyAny>>,
    distributed: Option<Py<PyAny>>,
    scorer: Option<Py<PyAny>>,
    temp: Option<&Bound<'py, PyAny>>,
    ctrl_c: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    guard("train_native", || {
        let head = if let Ok(m) = model.cast::<PyBlipModel>() {
            Head::Caption(m.borrow())
        } else if let Ok(m) = model.cast::<PyBlipVqaModel>() {
            Head::Vqa(m.borrow())
        } else if let Ok(m) = model.cast::<PyBlipRetrievalModel>() {
            let temp = temp.ok_or_else(|| {
                PyValueError::new_err("training the retrieval head needs its temperature (temp=)")
            })?;
            Head::Retrieval(m.borrow(), temp)
        } else {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "train_native takes a BLIP head's native handle, got {}",
                model.get_type().name()?
            )));
        };
        let (rank, world_size) = match &distributed {
            Some(d) => (
                d.bind(py).getattr("rank")?.extract::<usize>()?,
                d.bind(py).getattr("world_size")?.extract::<usize>()?,
            ),
            None => (0, 1),
        };
        let mut collective = distributed.map(|handle| PyCollective { handle, error: None });
        let mut config = TrainConfig::from_settings(json::from_dict(settings)?).py()?;
        config.rank = rank;
        config.world_size = world_size;
        let bos = match &head {
            Head::Caption(m) => m.lock()?.config.text_config.bos_token_id,
            Head::Vqa(m) => locked(&m.inner).py()?.config.text_config.bos_token_id,
            Head::Retrieval(m, _) => locked(&m.inner).py()?.config.text_config.bos_token_id,
        };
        let train_source = batch_source(train, "train_dataset", bos)?;
        let eval_source = match eval {
            Some(e) if !e.is_none() => Some(batch_source(e, "eval_dataset", bos)?),
            _ => None,
        };
        let mut observer = PyObserver {
            inner: match &head {
                Head::Caption(m) => Some(m.inner.clone()),
                _ => None,
            },
            callback,
            scorer,
            ctrl_c,
            interrupted: false,
            error: None,
        };
        let run = Run {
            train: train_source,
            eval: eval_source,
            config: &config,
            adapter: &adapter,
            observer: &mut observer,
            collective: collective.as_mut(),
        };
        let outcome = match &head {
            Head::Caption(model) => {
                let model: &PyBlipModel = model;
                let inner = model.inner.clone();
                py.detach(|| {
                    let mut m = locked(&inner)?;
                    let outcome = run.go(&mut *m);
                    model.refresh(&m);
                    outcome
                })
            }
            Head::Vqa(model) => {
                let model: &PyBlipVqaModel = model;
                let inner = model.inner.clone();
                py.detach(|| {
                    let mut m = locked(&inner)?;
                    let outcome = run.go(&mut *m);
                    model.refresh(&m);
                    outcome
                })
            }
            Head::Retrieval(model, temp) => {
                let temp = tensor::from_py(temp, "temp")?;
                let inner = model.inner.clone();
                py.detach(|| {
                    let mut m = locked(&inner)?;
                    let device = m.device();
                    if temp.dim() != 0 || temp.kind() != tch::Kind::Float || temp.device() != device {
                        return Err(crate::Error::invalid(format!(
                            "temp must be a 0-dim float32 tensor on the model's device ({device:?}), got {:?} {:?} \
                             on {:?}",
                            temp.kind(),
                            temp.size(),
                            temp.device()
                        )));
                    }
                    let mut task = RetrievalTask {
                        model: &mut m,
                        temp,
                    };
                    run.go(&mut task)
                })
            }
        };
        drop(head);
        if let Some(e) = observer.error.take() {
            return Err(e);
        }
        if let Some(e) = collective.as_mut().and_then(|c| c.error.take()) {
            return Err(e);
        }
        let outcome = outcome.py()?;
        let d = PyDict::new(py);
        let history = PyList::empty(py);
        for l in &outcome.history {
            history.append(log_dict(py, l)?)?;
        }
        d.set_item("history", history)?;
        d.set_item("eval_history", outcome.eval_history.clone())?;
        let metric_history = PyList::empty(py);
        for EvalRecord { step, metrics } in &outcome.metric_history {
            let m = PyDict::new(py);
            for (name, value) in &metrics.0 {
                m.set_item(name, value)?;
            }
            metric_history.append((step, m))?;
        }
        d.set_item("metric_history", metric_history)?;
        d.set_item("best_metric", outcome.best_metric)?;
        d.set_item("best_global_step", outcome.best_global_step)?;
        d.set_item(
            "best_model_checkpoint",
            outcome
                .best_model_checkpoint
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
        )?;
        d.set_item("global_step", outcome.global_step)?;
        d.set_item("total_steps", outcome.total_steps)?;
        d.set_item("interrupted", outcome.interrupted || observer.interrupted)?;
        d.set_item(
            "last_checkpoint",
            outcome.last_checkpoint.map(|p| p.to_string_lossy().into_owned()),
        )?;
        let cache = &outcome.feature_cache;
        let c = PyDict::new(py);
        c.set_item("enabled", cache.enabled)?;
        c.set_item("reason", cache.reason.clone())?;
        c.set_item("budget_bytes", cache.budget_bytes)?;
        c.set_item("hits", cache.hits)?;
        c.set_item("misses", cache.misses)?;
        c.set_item("cached_examples", cache.cached_examples)?;
        c.set_item("cached_bytes", cache.cached_bytes)?;
        c.set_item("cross_projections", cache.cross_projections)?;
        d.set_item("feature_cache", c)?;
        Ok(d)
    })
}

/// Collates tokenised captions the way training does: `(input_ids, attention_mask, labels)` tensors (the
/// first `prompt_tokens` tokens after BOS left out of the labels).
#[pyfunction]
#[pyo3(signature = (captions, bos_token_id, pad_token_id, max_length=None, prompt_tokens=0))]
pub fn collate_captions<'py>(
    py: Python<'py>,
    captions: Vec<Vec<i64>>,
    bos_token_id: i64,
    pad_token_id: i64,
    max_length: Option<&Bound<'py, PyAny>>,
    prompt_tokens: usize,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    guard("collate_captions", || {
        let max_length = crate::data::check_max_length(json::int_arg(max_length, "max_length")?).py()?;
        let (ids, mask, labels) = crate::data::collate_prompted_captions(
            &captions,
            bos_token_id,
            pad_token_id,
            max_length,
            prompt_tokens,
        )
        .py()?;
        Ok((
            tensor::to_py(py, &ids)?,
            tensor::to_py(py, &mask)?,
            tensor::to_py(py, &labels)?,
        ))
    })
}

/// Turns flush-to-zero for denormal floats on or off on this thread and libtorch's CPU threads; returns
/// the previous setting (`blip_peft.flush_denormals()` wraps it).
#[pyfunction]
pub fn set_flush_denormals(on: bool) -> bool {
    crate::train::denormals::set(on)
}
