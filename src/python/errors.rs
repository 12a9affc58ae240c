//! The one place core errors become Python exceptions.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{
    PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;

use crate::error::Error;

pyo3::create_exception!(
    _blip_peft,
    BlipPeftError,
    pyo3::exceptions::PyRuntimeError,
    "An error raised inside libtorch while running the model."
);

pyo3::create_exception!(
    _blip_peft,
    BlipPeftInternalError,
    pyo3::exceptions::PyRuntimeError,
    "A bug in blip_peft: its native core failed an internal check (a Rust panic). Please report it."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("BlipPeftError", m.py().get_type::<BlipPeftError>())?;
    m.add(
        "BlipPeftInternalError",
        m.py().get_type::<BlipPeftInternalError>(),
    )
}

/// The last line of defence at the binding boundary: runs `f` and turns a Rust panic (in `f` or in a worker
/// thread whose panic `f` resumed) into a `BlipPeftInternalError` that says it is a bug, so no
/// `pyo3_runtime.PanicException` (a `BaseException` that `except Exception` misses) ever reaches Python.
/// Every native entry point runs its body through this.
pub fn guard<T>(what: &str, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(BlipPeftInternalError::new_err(format!(
            "internal error in blip_peft's native core during {what}: {} (this is a bug in blip_peft, \
             not in your input; please report it with the call that caused it)",
            panic_message(payload.as_ref())
        ))),
    }
}

/// The text a panic was raised with.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Maps a core error to the Python exception a user of transformers would expect.
pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        // A file that is not what it should be (e.g. not UTF-8 text) is bad input, not an OS failure.
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData => {
            PyValueError::new_err(format!("{msg} (the file is not valid text)"))
        }
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::Config(_) | Error::Checkpoint(_) | Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::Type(_) => PyTypeError::new_err(msg),
        Error::Unsupported(_) => PyValueError::new_err(msg),
        Error::OutOfMemory(_) => PyMemoryError::new_err(msg),
        Error::Busy(_) | Error::Callback(_) => PyRuntimeError::new_err(msg),
        // libtorch's allocators throw (never abort): a request bigger than the memory left is a MemoryError.
        Error::Torch(_) if is_out_of_memory(&msg) => PyMemoryError::new_err(format!(
            "{msg} (the request needs more memory than is free: use fewer or smaller inputs, or a smaller \
             batch, beams or num_return_sequences)"
        )),
        Error::Torch(_) => BlipPeftError::new_err(msg),
    }
}

/// Whether a libtorch message is an allocation failure (CPU or CUDA).
fn is_out_of_memory(msg: &str) -> bool {
    [
        "not enough memory",
        "out of memory",
        "Storage size calculation overflowed",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

/// `?`-friendly conversion for core results.
pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

impl<T> IntoPyResult<T> for Result<T, tch::TchError> {
    fn py(self) -> PyResult<T> {
        self.map_err(|e| to_py(Error::Torch(e)))
    }
}
