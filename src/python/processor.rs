//! `_ImageProcessor` and `_Tokenizer`: the native halves of `blip_peft.BlipImageProcessor` and
//! `blip_peft.BlipTokenizer`. Inputs are copied out of Python objects while the GIL is held; the batch
//! then runs on rayon threads with the GIL released.

use std::path::PathBuf;

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyString, PyTuple};

use super::errors::{guard, IntoPyResult};
use crate::processor::{
    preprocess_images, BlipTokenizer, ImageProcessorConfig, ImageSource, Padding, PixelMode, PixelValues,
    Resample, TokenizeOptions,
};

/// The image half of the processor: decode, convert to RGB, resize, rescale, normalise.
#[pyclass(module = "blip_peft._blip_peft", name = "_ImageProcessor", frozen)]
pub struct PyImageProcessor {
    cfg: ImageProcessorConfig,
}

#[pymethods]
impl PyImageProcessor {
    #[new]
    #[pyo3(signature = (
        *, do_convert_rgb, do_resize, height, width, resample, do_rescale, rescale_factor, do_normalize,
        image_mean, image_std, max_image_pixels
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        do_convert_rgb: bool,
        do_resize: bool,
        height: usize,
        width: usize,
        resample: i64,
        do_rescale: bool,
        rescale_factor: f64,
        do_normalize: bool,
        image_mean: [f64; 3],
        image_std: [f64; 3],
        max_image_pixels: Option<u64>,
    ) -> PyResult<Self> {
        let resample = Resample::from_pil(resample).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown resample filter {resample}: use 0 (nearest), 1 (lanczos), 2 (bilinear), 3 (bicubic), \
                 4 (box) or 5 (hamming)"
            ))
        })?;
        let cfg = ImageProcessorConfig {
            do_convert_rgb,
            do_resize,
            height,
            width,
            resample,
            do_rescale,
            rescale_factor,
            do_normalize,
            image_mean,
            image_std,
            max_image_pixels,
        };
        cfg.validate().py()?;
        Ok(Self { cfg })
    }

    /// Preprocesses a list of images. Each item is a path (str), encoded bytes, a uint8 numpy array
    /// (H, W) or (H, W, C), or a tuple `(mode, width, height, data, palette)` of decoded PIL pixels.
    /// Returns a float32 array `[N, 3, H, W]`, or a list of `[3, h, w]` arrays when sizes differ.
    fn __call__<'py>(&self, py: Python<'py>, images: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyAny>> {
        let sources = images
            .iter()
            .enumerate()
            .map(|(i, obj)| to_source(i, &obj))
            .collect::<PyResult<Vec<_>>>()?;
        let cfg = self.cfg.clone();
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
        Ok(Self {
            inner: BlipTokenizer::from_json(json).py()?,
        })
    }

    /// The `tokenizer.json` text.
    #[pyo3(signature = (pretty=true))]
    fn to_str(&self, pretty: bool) -> PyResult<String> {
        self.inner.to_json(pretty).py()
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    #[pyo3(signature = (with_added_tokens=true))]
    fn vocab_size(&self, with_added_tokens: bool) -> usize {
        self.inner.vocab_size(with_added_tokens)
    }

    /// Tokenises texts. `padding` is "none", "longest" or "max_length"; `max_length` is the padding
    /// length for "max_length"; `truncation` the row length limit (None: no truncation).
    #[pyo3(signature = (
        texts, *, add_special_tokens, padding, max_length, truncation, pad_to_multiple_of, pad_id, pad_token,
        padding_side="right", truncation_side="right"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        add_special_tokens: bool,
        padding: &str,
        max_length: Option<usize>,
        truncation: Option<usize>,
        pad_to_multiple_of: Option<usize>,
        pad_id: u32,
        pad_token: String,
        padding_side: &str,
        truncation_side: &str,
    ) -> PyResult<EncodedLists> {
        let padding = match (padding, max_length) {
            ("none", _) => Padding::None,
            ("longest", _) => Padding::Longest,
            ("max_length", Some(n)) => Padding::MaxLength(n),
            ("max_length", None) => {
                return Err(PyValueError::new_err("padding='max_length' needs max_length"))
            }
            (other, _) => {
                return Err(PyValueError::new_err(format!(
                    "unknown padding strategy {other:?}"
                )))
            }
        };
        let side = |name: &str, value: &str| match value {
            "left" => Ok(true),
            "right" => Ok(false),
            _ => Err(PyValueError::new_err(format!(
                "{name} must be 'left' or 'right', got {value:?}"
            ))),
        };
        let opts = TokenizeOptions {
            add_special_tokens,
            padding,
            pad_to_multiple_of,
            truncation,
            pad_left: side("padding_side", padding_side)?,
            truncate_left: side("truncation_side", truncation_side)?,
            pad_id,
            pad_token,
        };
        let inner = &self.inner;
        let enc = guard("tokenizing", || {
            py.detach(|| inner.encode_batch(&texts, &opts)).py()
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
