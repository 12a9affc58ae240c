//! Zero-copy exchange of tensors with Python's torch: the same `at::Tensor`, storage and autograd
//! graph on both sides, so `.backward()` in Python fills the gradients of our parameters.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use tch::python::CPyObject;
use tch::Tensor;

use super::errors::IntoPyResult;

/// The tensor inside a `torch.Tensor`, or a TypeError naming `what`.
pub fn from_py(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    // SAFETY: `obj` is a live Python object for the duration of the call; unpack only reads it.
    let t = unsafe { Tensor::pyobject_unpack(obj.as_ptr() as *mut CPyObject) }.py()?;
    let t = t.ok_or_else(|| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("{what} must be a torch.Tensor, got {ty}"))
    })?;
    // Tensors without data (the meta device) or on a device the core does not run on are refused by name,
    // not left to libtorch ("Cannot copy out of meta tensor") or to a device the core cannot name.
    let device: String = obj.getattr("device")?.getattr("type")?.extract()?;
    if device != "cpu" && device != "cuda" {
        let hint = if device == "meta" {
            " (a meta tensor has a shape but no values)"
        } else {
            ""
        };
        return Err(PyValueError::new_err(format!(
            "{what} is on the {device:?} device{hint}; blip_peft runs on \"cpu\" and \"cuda\": pass a tensor \
             with real values there, e.g. {what}.to(\"cpu\")"
        )));
    }
    Ok(t)
}

/// Like [`from_py`] for an optional argument (`None` stays `None`).
pub fn from_py_opt(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Tensor>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => from_py(o, what).map(Some),
    }
}

/// Wraps a tensor as a `torch.Tensor` sharing its data and autograd history.
pub fn to_py<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let ptr = t.pyobject_wrap().py()?;
    // SAFETY: THPVariable_Wrap returns a new (owned) reference, or null with a Python error set.
    unsafe { Bound::from_owned_ptr_or_err(py, ptr as *mut pyo3::ffi::PyObject) }
}
