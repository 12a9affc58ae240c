//! `_ImageProcessor` and `_Tokenizer`: the native halves of `blip_peft.BlipImageProcessor` and
//! `blip_peft.BlipTokenizer`. Inputs are copied out of Python objects while the GIL is held; the batch
//! then runs on rayon threads with the GIL released.

use std::path::PathBuf;

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyUserWarning, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};

use super::errors::{guard, IntoPyResult};
use super::json;
use crate::processor::{
    preprocess_images, BlipTokenizer, EncodeArgs, ImageProcessorConfig, ImageSource, PixelMode, PixelValues,
    Side, TokenizerSettings,
};

/// The image half of the processor: its settings (read, checked and written by the core) and the batch
/// pipeline (decode, convert to RGB, resize, rescale, normalise).
#[pyclass(module = "blip_peft._blip_peft", name = "_ImageProcessor", frozen)]
pub struct PyImageProcessor {
    cfg: ImageProcessorConfig,
}

fn dict_value(dict: Option<&Bound<'_, PyDict>>) -> PyResult<serde_json::Value> {
    dict.map_or(Ok(serde_json::Value::Null), json::from_dict)
}

#[pymethods]
impl PyImageProcessor {
    /// Settings from a dict: the keywords of `BlipImageProcessor(...)` or a `preprocessor_config.json`'s keys
    /// (absent or None: the default; keys that are not settings are kept and written back).
    #[new]
    #[pyo3(signature = (settings=None))]
    fn new(settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        guard("BlipImageProcessor()", || {
            let settings = match settings {
                Some(d) => json::from_dict(d)?,
                None => serde_json::Value::Object(Default::default()),
            };
            Ok(Self {
                cfg: ImageProcessorConfig::from_json(settings).py()?,
            })
        })
    }

    /// Reads `preprocessor_config.json` or the `image_processor` entry of `processor_config.json` in a
    /// folder, with `overrides` over the file's values.
    #[staticmethod]
    #[pyo3(signature = (path, overrides=None))]
    fn from_pretrained(path: PathBuf, overrides: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        guard("BlipImageProcessor.from_pretrained", || {
            Ok(Self {
                cfg: ImageProcessorConfig::from_pretrained(&path, dict_value(overrides)?).py()?,
            })
        })
    }

    /// The names of the settings (the keywords `BlipImageProcessor` and its calls take).
    #[staticmethod]
    fn setting_names() -> Vec<&'static str> {
        ImageProcessorConfig::setting_names().to_vec()
    }

    /// This processor with a call's keywords applied (None: the setting as it is; `max_image_pixels=None`:
    /// no limit); an unknown keyword is a TypeError, a bad value a ValueError naming it.
    fn with_overrides(&self, overrides: &Bound<'_, PyDict>) -> PyResult<Self> {
        guard("the image processor keywords", || {
            Ok(Self {
                cfg: self.cfg.with_overrides(json::from_dict(overrides)?).py()?,
            })
        })
    }

    /// Every setting by name.
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        guard("the image processor settings", || {
            json::to_py(py, &self.cfg.settings())
        })
    }

    /// The settings file's contents (`preprocessor_config.json`), as transformers writes them.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        guard("BlipImageProcessor.to_dict", || {
            json::to_py(py, &self.cfg.to_json())
        })
    }

    /// Preprocesses a list of images. Each item is a path (str), encoded bytes, a uint8 numpy array
    /// (H, W) or (H, W, C), a float32/float64 array (H, W, 3) (values in [0, 1] or whole numbers in
    /// [0, 255], as transformers takes them), or a tuple `(mode, width, height, data, palette)` of decoded PIL pixels.
    /// Returns a float32 array `[N, 3, H, W]`, or a list of `[3, h, w]` arrays when sizes differ.
    #[pyo3(signature = (images, overrides=None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyList>,
        overrides: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let cfg = match overrides {
            Some(d) if !d.is_empty() => self.cfg.with_overrides(json::from_dict(d)?).py()?,
            _ => self.cfg.clone(),
        };
        let sources = images
            .iter()
            .enumerate()
            .map(|(i, obj)| to_source(i, &obj))
            .collect::<PyResult<Vec<_>>>()?;
        let pixels = guard("image processing", || {
            py.detach(move || preprocess_images(&cfg, &sources)).py()
        })?;
        match pixels {
            PixelValues::Batch {
                n,
                height,
                width,
                data,
            } => Ok(PyArray1::from_vec(py, data)
                .reshape([n, 3, height, width])?
                .into_any()),
            PixelValues::Ragged(images) => {
                let arrays = images
                    .into_iter()
                    .map(|(h, w, data)| Ok(PyArray1::from_vec(py, data).reshape([3, h, w])?.into_any()))
                    .collect::<PyResult<Vec<_>>>()?;
                Ok(PyList::new(py, arrays)?.into_any())
            }
        }
    }
}

impl PyImageProcessor {
    /// The settings, for the training data pipeline.
    pub fn config(&self) -> &ImageProcessorConfig {
        &self.cfg
    }
}

/// Copies one Python image object into a core `ImageSource`, naming the index on failure.
pub fn to_source(i: usize, obj: &Bound<'_, PyAny>) -> PyResult<ImageSource> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(ImageSource::Path(PathBuf::from(s.to_str()?)));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(ImageSource::Encoded(b.as_bytes().to_vec()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(ImageSource::Encoded(b.to_vec()));
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        let (mode, width, height, data, palette): (String, usize, usize, Vec<u8>, Option<Vec<u8>>) =
            t.extract().map_err(|e| {
                PyTypeError::new_err(format!(
                    "image {i}: expected (mode, width, height, data, palette) for decoded pixels: {e}"
                ))
            })?;
        let pixel_mode = PixelMode::from_pil(&mode, palette)
            .ok_or_else(|| PyValueError::new_err(format!("image {i}: unsupported image mode {mode:?}")))?;
        return Ok(ImageSource::Raw {
            mode: pixel_mode,
            width,
            height,
            data,
        });
    }
    if let Ok(array) = obj.cast::<PyArrayDyn<u8>>() {
        let shape = array.shape().to_vec();
        let data = match array.readonly().as_slice() {
            Ok(slice) => slice.to_vec(),
            Err(_) => array.readonly().as_array().iter().copied().collect(),
        };
        return ImageSource::from_hwc(&shape, data)
            .map_err(|e| PyValueError::new_err(format!("image {i}: {e}")));
    }
    if let Ok(array) = obj.cast::<PyArrayDyn<f64>>() {
        let data = array.readonly().as_array().iter().copied().collect();
        return float_source(i, array.shape(), data, true);
    }
    if let Ok(array) = obj.cast::<PyArrayDyn<f32>>() {
        let data = array.readonly().as_array().iter().map(|&x| x as f64).collect();
        return float_source(i, array.shape(), data, false);
    }
    if let Ok(array) = obj.cast::<PyUntypedArray>() {
        return Err(PyTypeError::new_err(format!(
            "image {i}: numpy array of dtype {} is not supported; expected uint8 (height, width[, channels])",
            array.dtype()
        )));
    }
    Err(PyTypeError::new_err(format!(
        "image {i}: unsupported type {}; expected a PIL image, a uint8 numpy array, a path or encoded bytes",
        obj.get_type().name()?
    )))
}

/// A float image `(height, width, 3)` (channels last) as a core source.
fn float_source(i: usize, shape: &[usize], data: Vec<f64>, double: bool) -> PyResult<ImageSource> {
    match *shape {
        [height, width, 3] => Ok(ImageSource::Float {
            width,
            height,
            data,
            double,
        }),
        _ => Err(PyValueError::new_err(format!(
            "image {i}: unsupported float array shape {shape:?}: expected (height, width, 3) or (3, height, width) \
             RGB pixels"
        ))),
    }
}

/// The text half: a `tokenizer.json` tokenizer with transformers' call-time options.
#[pyclass(module = "blip_peft._blip_peft", name = "_Tokenizer", frozen)]
pub struct PyTokenizer {
    inner: BlipTokenizer,
}

/// `(input_ids, attention_mask, token_type_ids)`, one list of ints per text.
type EncodedLists = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<u32>>);

#[pymethods]
impl PyTokenizer {
    /// Loads a `tokenizer.json` file.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = guard("tokenizer loading", || {
            py.detach(move || BlipTokenizer::from_file(&path)).py()
        })?;
        Ok(Self { inner })
    }

    /// Parses the JSON text of a `tokenizer.json`.
    #[staticmethod]
    fn from_str(json: &str) -> PyResult<Self> {
        guard("loading tokenizer.json", || {
            Ok(Self {
                inner: BlipTokenizer::from_json(json).py()?,
            })
        })
    }

    /// The `tokenizer.json` text.
    #[pyo3(signature = (pretty=true))]
    fn to_str(&self, pretty: bool) -> PyResult<String> {
        guard("writing tokenizer.json", || self.inner.to_json(pretty).py())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: i64) -> PyResult<Option<String>> {
        let index = u32::try_from(id).map_err(|_| {
            PyValueError::new_err(format!(
                "token id {id} is not a vocabulary index (ids run from 0 to vocab_size - 1)"
            ))
        })?;
        Ok(self.inner.id_to_token(index))
    }

    /// Every token with its id, the added tokens included when `with_added_tokens`.
    #[pyo3(signature = (with_added_tokens=true))]
    fn get_vocab(&self, with_added_tokens: bool) -> std::collections::HashMap<String, u32> {
        self.inner.vocab(with_added_tokens)
    }

    #[pyo3(signature = (with_added_tokens=true))]
    fn vocab_size(&self, with_added_tokens: bool) -> usize {
        self.inner.vocab_size(with_added_tokens)
    }

    /// Tokenises texts as transformers' `tokenizer(texts, **args)` does: `args` holds the call's arguments as
    /// given (`add_special_tokens`, `padding`, `truncation`, `max_length`, `pad_to_multiple_of`,
    /// `padding_side`), resolved by the core with the tokenizer's own settings; transformers' warnings are
    /// issued as Python warnings.
    #[pyo3(signature = (
        texts, args, *, model_max_length, pad_token, padding_side="right", truncation_side="right"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        args: &Bound<'_, PyDict>,
        model_max_length: &Bound<'_, PyAny>,
        pad_token: Option<String>,
        padding_side: &str,
        truncation_side: &str,
    ) -> PyResult<EncodedLists> {
        let args = EncodeArgs::from_keywords(json::from_dict(args)?).py()?;
        // transformers' "no maximum" is 1e30 (an int past 64 bits); a negative or fractional one is a mistake.
        let model_max_length: u128 = model_max_length.extract().map_err(|_| {
            PyValueError::new_err(format!(
                "the tokenizer's model_max_length must be a non-negative int (tokenizer_config.json), got {}; \
                 set it to the model's position limit",
                model_max_length
                    .repr()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|_| "?".into())
            ))
        })?;
        let settings = TokenizerSettings {
            model_max_length,
            pad_token,
            padding_side: Side::parse("padding_side", padding_side).py()?,
            truncation_side: Side::parse("truncation_side", truncation_side).py()?,
        };
        let (options, warnings) = self.inner.resolve(&args, &settings).py()?;
        let category = py.get_type::<PyUserWarning>();
        for warning in warnings {
            let message = std::ffi::CString::new(warning).unwrap_or_default();
            PyErr::warn(py, &category, &message, 2)?;
        }
        let inner = &self.inner;
        let enc = guard("tokenizing", || {
            py.detach(|| inner.encode_batch(&texts, &options)).py()
        })?;
        Ok((enc.input_ids, enc.attention_mask, enc.token_type_ids))
    }

    /// Decodes rows of token ids (negative ids are refused, as transformers refuses them).
    #[pyo3(signature = (rows, *, skip_special_tokens, clean_up_tokenization_spaces))]
    fn decode_batch(
        &self,
        py: Python<'_>,
        rows: Vec<Vec<i64>>,
        skip_special_tokens: bool,
        clean_up_tokenization_spaces: bool,
    ) -> PyResult<Vec<String>> {
        let rows = rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                row.into_iter()
                    .map(|id| {
                        u32::try_from(id).map_err(|_| {
                            PyValueError::new_err(format!("row {i}: token id {id} is not a vocabulary index"))
                        })
                    })
                    .collect::<PyResult<Vec<u32>>>()
            })
            .collect::<PyResult<Vec<_>>>()?;
        let inner = &self.inner;
        guard("decoding", || {
            py.detach(|| inner.decode_batch(&rows, skip_special_tokens, clean_up_tokenization_spaces))
                .py()
        })
    }
}

/// Applies augmentation operations (`augment::Op` as dicts: `{"op": "Rotate", "degrees": 15.0}`) to one
/// image (a uint8 `(height, width[, channels])` array, or anything the processor takes) in order, and
/// returns the RGB result as a uint8 `(height, width, 3)` array. For tests against PIL and for inspection.
#[pyfunction]
pub fn augment_image<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    ops: &Bound<'py, pyo3::types::PyList>,
) -> PyResult<Bound<'py, PyAny>> {
    guard("augment_image", || {
        let source = to_source(0, image)?;
        let ops = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let dict = op.cast::<PyDict>().map_err(|_| {
                    PyTypeError::new_err(format!("ops[{i}] must be a dict like {{\"op\": \"Flip\"}}"))
                })?;
                serde_json::from_value::<crate::processor::augment::Op>(super::json::from_dict(dict)?)
                    .map_err(|e| PyValueError::new_err(format!("ops[{i}]: {e}")))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let rgb = py
            .detach(|| -> crate::Result<_> {
                let rgb = crate::processor::load_rgb(&source, None)?;
                crate::processor::augment::apply(rgb, &ops)
            })
            .py()?;
        let (h, w) = (rgb.height, rgb.width);
        let data: Vec<u8> = rgb
            .data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        Ok(PyArray1::from_vec(py, data).reshape([h, w, 3])?.into_any())
    })
}

/// The operations `train(augment=settings)` draws for example `index` of an image of `width x height` in
/// `epoch` of a run seeded `seed`, resized to `out_height x out_width` with PIL filter `resample`: dicts
/// [`augment_image`] takes. For tests and inspection.
#[pyfunction]
#[pyo3(signature = (settings, width, height, out_height, out_width, seed, epoch, index, flip_allowed=true, resample=3))]
#[allow(clippy::too_many_arguments)]
pub fn augment_plan<'py>(
    py: Python<'py>,
    settings: &Bound<'py, PyDict>,
    width: usize,
    height: usize,
    out_height: usize,
    out_width: usize,
    seed: i64,
    epoch: i64,
    index: usize,
    flip_allowed: bool,
    resample: i64,
) -> PyResult<Bound<'py, PyAny>> {
    use crate::processor::augment::{plan, AugmentConfig, Stream};
    guard("augment_plan", || {
        let config = AugmentConfig::from_keywords(json::from_dict(settings)?).py()?;
        let filter = crate::processor::Resample::from_pil(resample).ok_or_else(|| {
            PyValueError::new_err(format!(
                "resample must be a PIL filter number 0-5, got {resample}"
            ))
        })?;
        if width == 0 || height == 0 || out_height == 0 || out_width == 0 {
            return Err(PyValueError::new_err("image and output sizes must be positive"));
        }
        let mut rng = Stream::new(seed, epoch, index);
        let ops = plan(
            &config,
            width,
            height,
            (out_height, out_width),
            filter,
            flip_allowed,
            &mut rng,
        );
        let value = serde_json::to_value(&ops).map_err(|e| PyValueError::new_err(e.to_string()))?;
        json::to_py(py, &value)
    })
}
