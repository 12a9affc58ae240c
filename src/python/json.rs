//! Python keyword arguments to the JSON values the core's settings are read from, and settings back to Python.
//! Each value keeps its type (a bool stays a bool, an int an int), so the core's checks see what the caller
//! passed; what JSON cannot hold is refused here, naming the argument.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
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
    if let Ok(mapping) = value.cast::<PyMapping>() {
        let mut map = serde_json::Map::new();
        for item in mapping.items()?.iter() {
            let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            let key: String = key
                .extract()
                .map_err(|_| PyTypeError::new_err(format!("{name}: dict keys must be strings")))?;
            let inner = from_value(&value, &format!("{name}[{key:?}]"))?;
            map.insert(key, inner);
        }
        return Ok(Value::Object(map));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a number, a string, a bool, a list, a dict or None, got {}",
        value.get_type().name()?
    )))
}

/// A JSON value as the Python object `json.loads` would give (objects as dicts, arrays as lists).
pub fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let items = items.iter().map(|v| to_py(py, v)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
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
