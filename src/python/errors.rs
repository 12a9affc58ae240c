//! The one place core errors become Python exceptions.

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

pyo3::create_exception!(
    _blip_peft,
    BlipPeftError,
    pyo3::exceptions::PyRuntimeError,
    "An error raised inside libtorch while running the model."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("BlipPeftError", m.py().get_type::<BlipPeftError>())
}

/// Maps a core error to the Python exception a user of transformers would expect.
pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::Config(_) | Error::Checkpoint(_) | Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::Type(_) => PyTypeError::new_err(msg),
        Error::Unsupported(_) => PyValueError::new_err(msg),
        Error::Busy(_) | Error::Callback(_) => PyRuntimeError::new_err(msg),
        Error::Torch(_) => BlipPeftError::new_err(msg),
    }
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
