//! Preparing model inputs: images to normalised pixel tensors, captions to token ids — the numbers
//! transformers' `BlipProcessor` (PIL backend) produces, computed on all cores.
//!
//! * `augment.rs`: training-time augmentation (random resized crop, flip, RandAugment), seeded per image.
//! * `config.rs`: the image settings (`preprocessor_config.json`), their checks and call-time overrides.
//! * `image.rs`: decoding and PIL-exact conversion to RGB.
//! * `resize.rs`: PIL-exact resampling.
//! * `tokenizer.rs`: BERT WordPiece through the `tokenizers` crate, with transformers' padding,
//!   truncation and decoding rules.
//!
//! This module holds the batch pipeline (decode → RGB → resize → rescale →
//! normalise → float32 NCHW), one image per rayon task.

pub mod augment;
mod buffers;
pub mod config;
pub mod image;
mod jpeg;
pub mod resize;
pub mod tokenizer;

use rayon::prelude::*;

use crate::error::{Error, Result};
pub use config::{ImageProcessorConfig, ImageSize};
pub use image::{ImageSource, PixelMode, RgbImage, DEFAULT_MAX_IMAGE_PIXELS};
pub use resize::Resample;
pub use tokenizer::{
    BlipTokenizer, EncodeArgs, Encoding, Padding, PaddingStrategy, Side, TokenizeOptions, TokenizerSettings,
    TruncationStrategy,
};

/// Preprocessed pixels, float32, channels first.
#[derive(Debug)]
pub enum PixelValues {
    /// All images have the same size: one `[n, 3, height, width]` buffer.
    Batch {
        n: usize,
        height: usize,
        width: usize,
        data: Vec<f32>,
    },
    /// Sizes differ (no resizing): one `[3, h, w]` buffer per image.
    Ragged(Vec<(usize, usize, Vec<f32>)>),
}

/// Names the offending image in an error: its index and, for files, its path.
fn at(index: usize, source: &ImageSource, err: image::LoadError) -> Error {
    let place = match source.describe() {
        Some(path) => format!("image {index} ({path})"),
        None => format!("image {index}"),
    };
    match err {
        image::LoadError::NotFound(path) => Error::not_found(format!("image {index}"), path),
        image::LoadError::Io(e) => Error::io(format!("cannot read {place}"), e),
        image::LoadError::Invalid(msg) => Error::invalid(format!("{place}: {msg}")),
    }
}

/// One image ready to be written out.
enum Prepared {
    /// 8-bit RGB (4-byte pixels) at the output size; `unit_range`: float pixels in `[0, 1]` that were scaled
    /// by 255 to be resized (transformers divides the resized pixels by 255 again before rescaling).
    Rgb { image: RgbImage, unit_range: bool },
    /// Float pixels kept as they are (no resizing), already rescaled and normalised, channels first.
    Chw {
        height: usize,
        width: usize,
        data: Vec<f32>,
    },
}

/// The per-channel tables: 8-bit pixels, and 8-bit pixels of float images scaled from `[0, 1]`.
struct Tables {
    plain: [[f32; 256]; 3],
    unit_range: [[f32; 256]; 3],
}

impl Tables {
    fn new(cfg: &ImageProcessorConfig) -> Self {
        Self {
            plain: cfg.lookup(),
            unit_range: cfg.lookup_unit_range(),
        }
    }
}

impl Prepared {
    fn size(&self) -> (usize, usize) {
        match self {
            Prepared::Rgb { image, .. } => (image.height, image.width),
            Prepared::Chw { height, width, .. } => (*height, *width),
        }
    }

    /// Writes the image into its `[3, height, width]` buffer.
    fn write(self, tables: &Tables, out: &mut [f32]) {
        match self {
            Prepared::Rgb { image, unit_range } => {
                let lut = if unit_range {
                    &tables.unit_range
                } else {
                    &tables.plain
                };
                write_chw(&image, lut, out);
                buffers::give(image.data);
            }
            Prepared::Chw { data, .. } => out.copy_from_slice(&data),
        }
    }
}

/// Decode/convert/resize one image to RGB (4-byte pixels) at the output size; float pixels without resizing
/// are rescaled and normalised as they are (transformers' numpy path).
fn prepare(cfg: &ImageProcessorConfig, index: usize, source: &ImageSource) -> Result<Prepared> {
    let (rgb, unit_range) = match source {
        ImageSource::Float {
            width,
            height,
            data,
            double,
        } => {
            let invalid = |msg: String| at(index, source, image::LoadError::Invalid(msg));
            image::check_size(*width, *height, cfg.max_image_pixels).map_err(invalid)?;
            if !cfg.do_resize {
                return Ok(Prepared::Chw {
                    height: *height,
                    width: *width,
                    data: cfg.float_chw(data, *height * *width, *double),
                });
            }
            let (bytes, unit_range) = image::float_to_u8(data).map_err(invalid)?;
            let rgb = image::raw_to_rgb(&PixelMode::RGB, *width, *height, &bytes).map_err(invalid)?;
            (rgb, unit_range)
        }
        _ => {
            let rgb = image::load_rgb(source, cfg.max_image_pixels, cfg.do_convert_rgb)
                .map_err(|e| at(index, source, e))?;
            (rgb, false)
        }
    };
    let ImageSize { height, width } = cfg.size;
    if !cfg.do_resize || (rgb.width == width && rgb.height == height) {
        return Ok(Prepared::Rgb {
            image: rgb,
            unit_range,
        });
    }
    let data = resize::resize_rgbx(&rgb.data, rgb.width, rgb.height, width, height, cfg.resample);
    Ok(Prepared::Rgb {
        image: RgbImage { width, height, data },
        unit_range,
    })
}

/// Writes a 4-byte-pixel image into a CHW float buffer through the per-channel table.
fn write_chw(rgb: &RgbImage, lut: &[[f32; 256]; 3], out: &mut [f32]) {
    let plane = rgb.width * rgb.height;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in rgb.data.chunks_exact(4).enumerate() {
        r[i] = lut[0][px[0] as usize];
        g[i] = lut[1][px[1] as usize];
        b[i] = lut[2][px[2] as usize];
    }
}

/// A zeroed float buffer for a batch's output, or an error naming `size` when it cannot be allocated
/// (rather than the abort `vec!` would give). On Linux, large buffers ask for transparent huge pages:
/// otherwise the first touch of each 4 KiB page of a ~100 MB output costs as much as resizing does.
fn output_buffer(len: usize, cfg: &ImageProcessorConfig) -> Result<Vec<f32>> {
    let refused = || {
        let ImageSize { height, width } = cfg.size;
        Error::invalid(format!(
            "size={height}x{width}: cannot allocate pixel_values of {} bytes; use a smaller size or fewer \
             images at a time",
            len as u128 * std::mem::size_of::<f32>() as u128
        ))
    };
    let buffer = if len == 0 {
        Vec::new()
    } else {
        let layout = std::alloc::Layout::array::<f32>(len).map_err(|_| refused())?;
        // SAFETY: the layout has a non-zero size; a non-null pointer from `alloc_zeroed` holds `len`
        // zeroed (valid) f32s allocated by the global allocator with exactly the layout `Vec` frees.
        unsafe {
            let ptr = std::alloc::alloc_zeroed(layout) as *mut f32;
            if ptr.is_null() {
                return Err(refused());
            }
            Vec::from_raw_parts(ptr, len, len)
        }
    };
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let bytes = len * std::mem::size_of::<f32>();
        if bytes >= 8 << 20 {
            let start = (buffer.as_ptr() as usize).div_ceil(PAGE) * PAGE;
            let end = (buffer.as_ptr() as usize + bytes) / PAGE * PAGE;
            // SAFETY: an advisory call on whole pages inside memory this Vec owns; it changes no
            // contents and its failure is harmless (the buffer then simply keeps small pages).
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    Ok(buffer)
}

/// Keeps the error of the lowest index, so messages do not depend on thread timing.
fn first_error(results: Vec<Result<()>>) -> Result<()> {
    results.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
}

/// Preprocesses `sources[i]` for each of `indices` to its own `[3, height, width]` buffer (resizing is
/// required), one image per rayon task. Each image succeeds or fails alone (errors name the index), so a
/// caller can skip unreadable items.
pub fn preprocess_selected(
    cfg: &ImageProcessorConfig,
    sources: &[ImageSource],
    indices: &[usize],
) -> Result<Vec<Result<Vec<f32>>>> {
    cfg.validate()?;
    if !cfg.do_resize {
        return Err(Error::invalid(
            "batches of images need do_resize=True (every image the same size)",
        ));
    }
    let tables = Tables::new(cfg);
    let plane = 3 * cfg.size.height * cfg.size.width;
    Ok(indices
        .par_iter()
        .map(|&i| {
            let src = sources
                .get(i)
                .ok_or_else(|| Error::invalid(format!("image index {i} is out of range")))?;
            let mut out = vec![0f32; plane];
            prepare(cfg, i, src)?.write(&tables, &mut out);
            Ok(out)
        })
        .collect())
}

/// [`preprocess_selected`] with training-time augmentation: image `i` of `indices` gets the operations
/// [`augment::plan`] draws from the stream of (`seed`, `epoch`, `i`) (the crop resizing it to the output
/// size; flipped only where `flip_allowed[i]`), so its pixels depend on nothing else (not the thread, nor
/// the batch it is in).
pub fn preprocess_augmented(
    cfg: &ImageProcessorConfig,
    aug: &augment::AugmentConfig,
    sources: &[ImageSource],
    indices: &[usize],
    (seed, epoch): (i64, i64),
    flip_allowed: &[bool],
) -> Result<Vec<Result<Vec<f32>>>> {
    cfg.validate()?;
    aug.validate()?;
    if !cfg.do_resize {
        return Err(Error::invalid(
            "batches of images need do_resize=True (every image the same size)",
        ));
    }
    let lut = cfg.lookup();
    let ImageSize { height, width } = cfg.size;
    Ok(indices
        .par_iter()
        .map(|&i| {
            let src = sources
                .get(i)
                .ok_or_else(|| Error::invalid(format!("image index {i} is out of range")))?;
            let rgb =
                image::load_rgb(src, cfg.max_image_pixels, cfg.do_convert_rgb).map_err(|e| at(i, src, e))?;
            let mut rng = augment::Stream::new(seed, epoch, i);
            let allowed = flip_allowed.get(i).copied().unwrap_or(true);
            let ops = augment::plan(
                aug,
                rgb.width,
                rgb.height,
                (height, width),
                cfg.resample,
                allowed,
                &mut rng,
            );
            let rgb = augment::apply(rgb, &ops)?;
            let mut out = vec![0f32; 3 * height * width];
            write_chw(&rgb, &lut, &mut out);
            buffers::give(rgb.data);
            Ok(out)
        })
        .collect())
}

/// Runs the whole image pipeline on a batch, one image per rayon task.
pub fn preprocess_images(cfg: &ImageProcessorConfig, sources: &[ImageSource]) -> Result<PixelValues> {
    cfg.validate()?;
    let tables = Tables::new(cfg);
    if cfg.do_resize {
        cfg.check_output(sources.len())?;
        let plane = 3 * cfg.size.height * cfg.size.width;
        let mut data = output_buffer(sources.len() * plane, cfg)?;
        let results: Vec<Result<()>> = data
            .par_chunks_mut(plane)
            .zip(sources.par_iter())
            .enumerate()
            .map(|(i, (out, src))| {
                prepare(cfg, i, src)?.write(&tables, out);
                Ok(())
            })
            .collect();
        first_error(results)?;
        return Ok(PixelValues::Batch {
            n: sources.len(),
            height: cfg.size.height,
            width: cfg.size.width,
            data,
        });
    }
    let images: Vec<Result<(usize, usize, Vec<f32>)>> = sources
        .par_iter()
        .enumerate()
        .map(|(i, src)| {
            let image = prepare(cfg, i, src)?;
            let (height, width) = image.size();
            let mut out = vec![0f32; 3 * width * height];
            image.write(&tables, &mut out);
            Ok((height, width, out))
        })
        .collect();
    let images = images.into_iter().collect::<Result<Vec<_>>>()?;
    let same = images.windows(2).all(|w| (w[0].0, w[0].1) == (w[1].0, w[1].1));
    match images.first() {
        Some(&(height, width, _)) if same => {
            let n = images.len();
            let data = images.into_iter().flat_map(|(_, _, d)| d).collect();
            Ok(PixelValues::Batch {
                n,
                height,
                width,
                data,
            })
        }
        _ => Ok(PixelValues::Ragged(images)),
    }
}

/// Decodes and converts one image to RGB without resizing (for tests and tools).
pub fn load_rgb(source: &ImageSource, max_image_pixels: Option<u64>) -> Result<RgbImage> {
    image::load_rgb(source, max_image_pixels, true).map_err(|e| at(0, source, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(w: usize, h: usize, v: u8) -> ImageSource {
        ImageSource::Raw {
            mode: PixelMode::RGB,
            width: w,
            height: h,
            data: vec![v; w * h * 3],
        }
    }

    #[test]
    fn batch_shape_and_values() {
        let cfg = ImageProcessorConfig::default();
        let out = preprocess_images(&cfg, &[raw(10, 20, 255), raw(500, 300, 0)]).unwrap();
        let PixelValues::Batch {
            n,
            height,
            width,
            data,
        } = out
        else {
            panic!("expected a batch")
        };
        assert_eq!((n, height, width, data.len()), (2, 384, 384, 2 * 3 * 384 * 384));
        let expect = ((1.0f64) as f32 - 0.48145466f32) / 0.26862954f32;
        assert_eq!(data[0], expect);
    }

    #[test]
    fn errors_name_the_index() {
        let cfg = ImageProcessorConfig::default();
        let bad = ImageSource::Encoded(b"garbage".to_vec());
        let err = preprocess_images(&cfg, &[raw(4, 4, 1), bad.clone(), bad]).unwrap_err();
        assert!(err.to_string().starts_with("image 1:"), "{err}");
        let missing = ImageSource::Path("/nonexistent/x.jpg".into());
        let err = preprocess_images(&cfg, &[missing]).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }

    #[test]
    fn the_pixel_limit_applies_to_decoded_pixels_too() {
        let cfg = ImageProcessorConfig {
            do_resize: false,
            max_image_pixels: Some(100),
            ..Default::default()
        };
        preprocess_images(&cfg, &[raw(10, 10, 1)]).unwrap();
        let err = preprocess_images(&cfg, &[raw(10, 10, 1), raw(11, 10, 1)]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("image 1: image size (110 pixels, 11x10) exceeds the limit of 100 pixels"),
            "{err}"
        );
        let array = ImageSource::from_hwc(&[20, 20], vec![0; 400]).unwrap();
        assert!(preprocess_images(&cfg, &[array]).is_err());
    }

    #[test]
    fn a_batch_too_large_to_allocate_is_an_error_naming_size() {
        let cfg = ImageProcessorConfig {
            size: ImageSize {
                height: 4096,
                width: 4096,
            },
            ..Default::default()
        };
        let memory = config::memory_bytes();
        let images = usize::try_from(memory / (3 * 4096 * 4096 * 4) + 1).unwrap_or(usize::MAX);
        // Never decoded: the sources are checked for the output's size before anything is read.
        let sources = vec![ImageSource::Encoded(Vec::new()); images.min(1 << 20)];
        if images <= 1 << 20 {
            let err = preprocess_images(&cfg, &sources).unwrap_err().to_string();
            assert!(err.starts_with("size=4096x4096: pixel_values for"), "{err}");
        }
    }

    #[test]
    fn float_pixels_follow_transformers() {
        // Whole numbers in [0, 255] are cast; [0, 1] is scaled by 255 (truncated); anything else is refused.
        assert_eq!(
            image::float_to_u8(&[0.0, 12.0, 255.0]).unwrap(),
            (vec![0, 12, 255], false)
        );
        assert_eq!(
            image::float_to_u8(&[0.0, 0.5, 1.0]).unwrap(),
            (vec![0, 127, 255], true)
        );
        assert!(image::float_to_u8(&[0.5, 2.0]).is_err());
        assert!(image::float_to_u8(&[-1.0, 3.0]).is_err());
        assert!(image::float_to_u8(&[f64::NAN]).is_err());
        let float = |v: f64| ImageSource::Float {
            width: 2,
            height: 2,
            data: vec![v; 12],
            double: false,
        };
        // A [0, 1] image resized is divided by 255 once more before do_rescale (transformers' double rescale).
        let cfg = ImageProcessorConfig {
            do_normalize: false,
            size: ImageSize { height: 3, width: 3 },
            ..Default::default()
        };
        let PixelValues::Batch { data, .. } = preprocess_images(&cfg, &[float(0.5), float(127.0)]).unwrap()
        else {
            panic!("expected a batch")
        };
        let scaled = ((127.0f64 * (1.0 / 255.0)) as f32 as f64 * cfg.rescale_factor) as f32;
        assert_eq!(data[0], scaled);
        assert_eq!(data[27], (127.0f64 * cfg.rescale_factor) as f32);
        // Without resizing the floats are rescaled as they are.
        let cfg = ImageProcessorConfig {
            do_resize: false,
            do_normalize: false,
            ..Default::default()
        };
        let PixelValues::Batch { data, .. } = preprocess_images(&cfg, &[float(0.5)]).unwrap() else {
            panic!("expected a batch")
        };
        assert_eq!(data[0], (0.5 * cfg.rescale_factor) as f32);
    }

    #[test]
    fn ragged_without_resize() {
        let cfg = ImageProcessorConfig {
            do_resize: false,
            ..Default::default()
        };
        let out = preprocess_images(&cfg, &[raw(4, 4, 1), raw(5, 4, 1)]).unwrap();
        assert!(matches!(out, PixelValues::Ragged(ref v) if v.len() == 2));
    }
}
