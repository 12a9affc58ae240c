//! Python keyword arguments to the JSON values the core's settings are read from. Each value keeps its type
//! (a bool stays a bool, an int an int), so the core's checks see what the caller passed; what JSON cannot
//! hold is refused here, naming the argument.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::Value;

/// A dict of keyword arguments (string keys) to a JSON object.
pub fn from_dict(dict: &Bound<'_, PyDict>) -> PyResult<Value> {
    let mut map = serde_json::Map::new();
    for (key, value) in dict.iter() {
        let key: String = key
            .extract()
            .map_err(|_| PyTypeError::new_err("keyword argument names must be strings"))?;
        let value = from_value(&value, &key)?;
        map.insert(key, value);
    }
    Ok(Value::Object(map))
}

/// One argument's value; `name` says which argument in an error.
fn from_value(value: &Bound<'_, PyAny>, name: &str) -> PyResult<Value> {
    if value.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if value.cast::<PyInt>().is_ok() {
        let n: i64 = value.extract().map_err(|_| {
            PyValueError::new_err(format!(
                "{name}={value} is out of range (a 64-bit integer is the most)"
            ))
        })?;
        return Ok(Value::from(n));
    }
    if value.cast::<PyFloat>().is_ok() {
        let x: f64 = value.extract()?;
        return serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| PyValueError::new_err(format!("{name} must be a finite number, got {x}")));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_string()));
    }
    if value.cast::<PyList>().is_ok() || value.cast::<PyTuple>().is_ok() {
        let items = value
            .try_iter()?
            .map(|item| from_value(&item?, name))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(Value::Array(items));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a number, a string, a bool or None, got {}",
        value.get_type().name()?
    )))
}

/// An optional integer argument, refused by name when it is not an int or does not fit 64 bits (instead of
/// pyo3's bare `OverflowError` / "'str' object cannot be interpreted as an integer").
pub fn int_arg(value: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<i64>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => match from_value(v, name)? {
            Value::Number(n) if n.is_i64() => Ok(n.as_i64()),
            _ => Err(PyTypeError::new_err(format!(
                "{name} must be an int or None, got {}",
                v.get_type().name()?
            ))),
        },
    }
}
