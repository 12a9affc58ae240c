//! Getting an 8-bit RGB image out of whatever the caller has: encoded bytes (JPEG, PNG, GIF, BMP, WebP,
//! TIFF), or pixels already decoded by PIL or numpy in one of PIL's modes.
//!
//! The conversions follow PIL's `Image.convert("RGB")` (transformers' `convert_to_rgb`), including its
//! less obvious choices: CMYK JPEGs are read with Adobe's inverted polarity, 16-bit greyscale (`I;16`)
//! clips to 255 rather than scaling, 16-bit colour keeps the high byte, alpha is dropped, not composited.

use std::path::PathBuf;

use super::{buffers, jpeg};

/// PIL's `Image.MAX_IMAGE_PIXELS`: PIL warns above it and refuses above twice as many pixels
/// (`DecompressionBombError`). Our default limit is PIL's refusal threshold.
pub const PIL_MAX_IMAGE_PIXELS: u64 = 89_478_485;
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 2 * PIL_MAX_IMAGE_PIXELS;

/// The layout of already-decoded pixels, named after PIL's modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PixelMode {
    /// 8-bit grey.
    L,
    /// 8-bit grey + alpha.
    LA,
    RGB,
    RGBA,
    /// RGB padded to 4 bytes.
    RGBX,
    /// Palette indices; `palette` holds RGB triples.
    P {
        palette: Vec<u8>,
    },
    /// Palette indices + alpha.
    PA {
        palette: Vec<u8>,
    },
    /// Ink coverage, 0 = no ink (PIL's in-memory CMYK).
    CMYK,
    /// 16-bit grey, little-endian (PIL's `I;16`).
    I16,
    /// 16-bit grey, big-endian (PIL's `I;16B`).
    I16B,
    /// 1-bit, packed 8 pixels a byte, most significant bit first, rows padded to whole bytes (PIL's `1`).
    Bilevel,
}

impl PixelMode {
    /// Parses a PIL mode name; palette modes take the palette separately.
    pub fn from_pil(mode: &str, palette: Option<Vec<u8>>) -> Option<PixelMode> {
        Some(match (mode, palette) {
            ("L", _) => PixelMode::L,
            ("LA", _) => PixelMode::LA,
            ("RGB", _) => PixelMode::RGB,
            ("RGBA", _) => PixelMode::RGBA,
            ("RGBX", _) => PixelMode::RGBX,
            ("P", Some(palette)) => PixelMode::P { palette },
            ("PA", Some(palette)) => PixelMode::PA { palette },
            ("CMYK", _) => PixelMode::CMYK,
            ("I;16" | "I;16L", _) => PixelMode::I16,
            ("I;16B", _) => PixelMode::I16B,
            ("1", _) => PixelMode::Bilevel,
            _ => return None,
        })
    }

    /// Bytes per row of `width` pixels.
    fn row_bytes(&self, width: usize) -> usize {
        match self {
            PixelMode::L | PixelMode::P { .. } => width,
            PixelMode::LA | PixelMode::PA { .. } | PixelMode::I16 | PixelMode::I16B => width * 2,
            PixelMode::RGB => width * 3,
            PixelMode::RGBA | PixelMode::RGBX | PixelMode::CMYK => width * 4,
            PixelMode::Bilevel => width.div_ceil(8),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            PixelMode::L => "L",
            PixelMode::LA => "LA",
            PixelMode::RGB => "RGB",
            PixelMode::RGBA => "RGBA",
            PixelMode::RGBX => "RGBX",
            PixelMode::P { .. } => "P",
            PixelMode::PA { .. } => "PA",
            PixelMode::CMYK => "CMYK",
            PixelMode::I16 => "I;16",
            PixelMode::I16B => "I;16B",
            PixelMode::Bilevel => "1",
        }
    }
}

/// One image as the caller handed it over.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// An encoded file's bytes.
    Encoded(Vec<u8>),
    /// A file to read and decode.
    Path(PathBuf),
    /// Decoded pixels, rows top to bottom, no padding beyond what the mode defines.
    Raw {
        mode: PixelMode,
        width: usize,
        height: usize,
        data: Vec<u8>,
    },
    /// Floating-point RGB pixels, channels last (`[height, width, 3]`), as numpy / torch float images come:
    /// values in `[0, 1]` or whole numbers in `[0, 255]`. `double`: the caller's array was float64
    /// (transformers then normalises unrescaled pixels in float64).
    Float {
        width: usize,
        height: usize,
        data: Vec<f64>,
        double: bool,
    },
}

impl ImageSource {
    /// Decoded pixels from a numpy-style array shape: `(H, W)` or `(H, W, C)` with C in 1..=4.
    pub fn from_hwc(shape: &[usize], data: Vec<u8>) -> Result<ImageSource, String> {
        let (height, width, channels) = match *shape {
            [h, w] => (h, w, 1),
            [h, w, c] => (h, w, c),
            _ => {
                return Err(format!(
                    "unsupported array shape {shape:?}: expected (height, width) or (height, width, channels)"
                ))
            }
        };
        let mode = match channels {
            1 => PixelMode::L,
            2 => PixelMode::LA,
            3 => PixelMode::RGB,
            4 => PixelMode::RGBA,
            c => {
                return Err(format!(
                    "unsupported array shape {shape:?}: {c} channels (expected 1, 2, 3 or 4, channels last)"
                ))
            }
        };
        Ok(ImageSource::Raw {
            mode,
            width,
            height,
            data,
        })
    }

    /// A short description for error messages (the path, when there is one).
    pub fn describe(&self) -> Option<String> {
        match self {
            ImageSource::Path(p) => Some(p.display().to_string()),
            _ => None,
        }
    }
}

/// An 8-bit RGB image, rows top to bottom, pixels interleaved as 4 bytes (R, G, B, unused) as PIL keeps
/// them in memory: the resampler's four lanes per tap vectorise where three would not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Why an image could not be turned into RGB pixels.
#[derive(Debug)]
pub enum LoadError {
    NotFound(PathBuf),
    Io(std::io::Error),
    /// Bad data or an unsupported input; the message says which.
    Invalid(String),
}

impl From<String> for LoadError {
    fn from(s: String) -> Self {
        LoadError::Invalid(s)
    }
}

/// The most bytes an image file may have: twice PIL's decompression-bomb pixel limit at 4 bytes a pixel,
/// uncompressed (BMP, TIFF) included. A larger file is refused before it is read.
pub const MAX_IMAGE_FILE_BYTES: u64 = 8 * PIL_MAX_IMAGE_PIXELS;

/// Reads an image file: only a regular file (not `/dev/zero`, a pipe or a folder, which would be read until
/// memory runs out or block), at most [`MAX_IMAGE_FILE_BYTES`] (checked on the size and again while reading,
/// for a file that grows).
fn read_image_file(path: &std::path::Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => LoadError::NotFound(path.to_path_buf()),
        _ => LoadError::Io(e),
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let too_big = || {
        LoadError::Invalid(format!(
            "{} is larger than {} MB, more than any image the pixel limit allows; pass an image file",
            path.display(),
            MAX_IMAGE_FILE_BYTES >> 20
        ))
    };
    if !meta.is_file() {
        return Err(LoadError::Invalid(format!(
            "{} is not a regular file (a folder, device or pipe); pass an image file",
            path.display()
        )));
    }
    if meta.len() > MAX_IMAGE_FILE_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_IMAGE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_IMAGE_FILE_BYTES {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Loads any source into RGB. `convert_rgb = false` refuses non-RGB pixels instead of converting them,
/// as transformers would fail on them later with `do_convert_rgb=False`. `max_pixels` applies to every
/// source: encoded images are refused before decoding, decoded pixels (arrays, PIL) before conversion.
pub fn load_rgb(
    source: &ImageSource,
    max_pixels: Option<u64>,
    convert_rgb: bool,
) -> Result<RgbImage, LoadError> {
    match source {
        ImageSource::Encoded(bytes) => decode(bytes, max_pixels, convert_rgb).map_err(LoadError::Invalid),
        ImageSource::Path(path) => {
            let bytes = read_image_file(path)?;
            decode(&bytes, max_pixels, convert_rgb).map_err(LoadError::Invalid)
        }
        ImageSource::Raw {
            mode,
            width,
            height,
            data,
        } => {
            if !convert_rgb && *mode != PixelMode::RGB {
                return Err(LoadError::Invalid(format!(
                    "image mode {} is not RGB and do_convert_rgb is False",
                    mode.name()
                )));
            }
            // Pixels decoded elsewhere (numpy arrays, PIL images) are held to the same limit.
            check_size(*width, *height, max_pixels)?;
            raw_to_rgb(mode, *width, *height, data).map_err(LoadError::Invalid)
        }
        ImageSource::Float {
            width, height, data, ..
        } => {
            check_size(*width, *height, max_pixels)?;
            let (bytes, _) = float_to_u8(data)?;
            raw_to_rgb(&PixelMode::RGB, *width, *height, &bytes).map_err(LoadError::Invalid)
        }
    }
}

/// Float pixels to 8 bits as transformers hands them to PIL for resizing (`to_pil_image`): whole numbers
/// in `[0, 255]` are cast as they are, values in `[0, 1]` are scaled by 255 first (through float32, then
/// truncated), anything else is refused. Also says whether the values were scaled (transformers then
/// divides the resized pixels by 255 again).
pub fn float_to_u8(data: &[f64]) -> Result<(Vec<u8>, bool), String> {
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut whole = true;
    for &x in data {
        min = min.min(x);
        max = max.max(x);
        // numpy's allclose(x, x.astype(int)): |x - trunc(x)| <= 1e-8 + 1e-5 |trunc(x)|
        whole &= (x - x.trunc()).abs() <= 1e-8 + 1e-5 * x.trunc().abs();
    }
    if data.iter().any(|x| x.is_nan()) {
        return Err("float pixels contain NaN".into());
    }
    if whole {
        if min < 0.0 || max > 255.0 {
            return Err(format!(
                "float pixels of whole numbers must lie in [0, 255] to be resized, got values from {min} to {max}"
            ));
        }
        return Ok((data.iter().map(|&x| x as u8).collect(), false));
    }
    if min < 0.0 || max > 1.0 {
        return Err(format!(
            "float pixels must lie in [0, 1] (or be whole numbers in [0, 255]) to be resized, got values from \
             {min} to {max}"
        ));
    }
    Ok((data.iter().map(|&x| ((x * 255.0) as f32) as u8).collect(), true))
}

pub(super) fn check_size(width: usize, height: usize, max_pixels: Option<u64>) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("empty image ({width}x{height} pixels)"));
    }
    let pixels = (width as u64).saturating_mul(height as u64);
    if let Some(limit) = max_pixels {
        if pixels > limit {
            return Err(format!(
                "image size ({pixels} pixels, {width}x{height}) exceeds the limit of {limit} pixels, \
                 could be a decompression bomb attack (raise max_image_pixels to allow it)"
            ));
        }
    }
    Ok(())
}

/// Converts decoded pixels in a PIL mode to RGB, as `Image.convert("RGB")` does.
pub fn raw_to_rgb(mode: &PixelMode, width: usize, height: usize, data: &[u8]) -> Result<RgbImage, String> {
    check_size(width, height, None)?;
    let row = mode.row_bytes(width);
    let expected = row
        .checked_mul(height)
        .ok_or_else(|| format!("image dimensions {width}x{height} overflow"))?;
    if data.len() != expected {
        return Err(format!(
            "{} pixel buffer of {} bytes does not match {width}x{height} (expected {expected} bytes)",
            mode.name(),
            data.len()
        ));
    }
    let mut out = buffers::take(width * height * 4);
    let px = out.chunks_exact_mut(4);
    let grey = |o: &mut [u8], v: u8| o[..3].fill(v);
    match mode {
        PixelMode::RGB => px
            .zip(data.chunks_exact(3))
            .for_each(|(o, p)| o[..3].copy_from_slice(p)),
        PixelMode::L => px.zip(data).for_each(|(o, &v)| grey(o, v)),
        PixelMode::LA => px.zip(data.chunks_exact(2)).for_each(|(o, p)| grey(o, p[0])),
        PixelMode::RGBA | PixelMode::RGBX => out.copy_from_slice(data),
        PixelMode::P { palette } => {
            let lut = palette_lut(palette);
            px.zip(data)
                .for_each(|(o, &i)| o[..3].copy_from_slice(&lut[i as usize]));
        }
        PixelMode::PA { palette } => {
            let lut = palette_lut(palette);
            px.zip(data.chunks_exact(2))
                .for_each(|(o, p)| o[..3].copy_from_slice(&lut[p[0] as usize]));
        }
        PixelMode::CMYK => px
            .zip(data.chunks_exact(4))
            .for_each(|(o, p)| o[..3].copy_from_slice(&cmyk_to_rgb(p))),
        PixelMode::I16 => px
            .zip(data.chunks_exact(2))
            .for_each(|(o, p)| grey(o, i16_to_u8(u16::from_le_bytes([p[0], p[1]])))),
        PixelMode::I16B => px
            .zip(data.chunks_exact(2))
            .for_each(|(o, p)| grey(o, i16_to_u8(u16::from_be_bytes([p[0], p[1]])))),
        PixelMode::Bilevel => {
            for (r, orow) in data.chunks_exact(row).zip(out.chunks_exact_mut(width * 4)) {
                for (x, o) in orow.chunks_exact_mut(4).enumerate() {
                    grey(o, if r[x / 8] & (0x80 >> (x % 8)) != 0 { 255 } else { 0 });
                }
            }
        }
    }
    Ok(RgbImage {
        width,
        height,
        data: out,
    })
}

/// A full 256-entry palette; entries the image's palette does not define are black, as in PIL.
fn palette_lut(palette: &[u8]) -> Vec<[u8; 3]> {
    let mut lut = vec![[0u8; 3]; 256];
    for (dst, src) in lut.iter_mut().zip(palette.chunks_exact(3)) {
        dst.copy_from_slice(src);
    }
    lut
}

/// PIL's `cmyk2rgb`: `nk - c * nk / 255` with its rounded integer division by 255.
#[inline]
fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = 255 - p[3] as i32;
    let f = |c: u8| {
        let t = c as i32 * nk + 128;
        (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
    };
    [f(p[0]), f(p[1]), f(p[2])]
}

/// PIL converts 16-bit grey to 8 bits by clipping, not scaling.
#[inline]
fn i16_to_u8(v: u16) -> u8 {
    v.min(255) as u8
}

/// Decodes an encoded image and converts it to RGB.
pub fn decode(bytes: &[u8], max_pixels: Option<u64>, convert_rgb: bool) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("cannot identify image file: no data".into());
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes, max_pixels, convert_rgb);
    }
    let Ok(format) = image::guess_format(bytes) else {
        return Err(
            "cannot identify image file: not a supported image format (JPEG, PNG, GIF, BMP, WebP, TIFF)"
                .into(),
        );
    };
    decode_other(bytes, format, max_pixels, convert_rgb)
}

fn decode_jpeg(bytes: &[u8], max_pixels: Option<u64>, convert_rgb: bool) -> Result<RgbImage, String> {
    let decoded = jpeg::decode(bytes, |w, h| check_size(w, h, max_pixels))?;
    let jpeg::Decoded {
        width,
        height,
        mode,
        data,
    } = decoded;
    if mode == PixelMode::RGBX {
        return Ok(RgbImage { width, height, data });
    }
    if !convert_rgb {
        buffers::give(data);
        return Err(format!(
            "JPEG in mode {} is not RGB and do_convert_rgb is False",
            mode.name()
        ));
    }
    let rgb = raw_to_rgb(&mode, width, height, &data);
    buffers::give(data);
    rgb
}

fn decode_other(
    bytes: &[u8],
    format: image::ImageFormat,
    max_pixels: Option<u64>,
    convert_rgb: bool,
) -> Result<RgbImage, String> {
    use image::{DynamicImage, ImageDecoder};
    let name = format!("{format:?}").to_uppercase();
    let bad = |e: image::ImageError| match (&e, max_pixels) {
        (image::ImageError::Limits(_), Some(limit)) => format!(
            "cannot decode {name}: the file needs more memory than the limit of {limit} pixels allows ({e}), \
             could be a decompression bomb attack (raise max_image_pixels to allow it)"
        ),
        _ => format!("cannot decode {name}: {e}"),
    };
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    reader.limits(decoder_limits(max_pixels));
    let decoder = reader.into_decoder().map_err(bad)?;
    let (w, h) = decoder.dimensions();
    check_size(w as usize, h as usize, max_pixels)?;
    let img = DynamicImage::from_decoder(decoder).map_err(bad)?;
    let (width, height) = (w as usize, h as usize);
    let (mode, data): (PixelMode, Vec<u8>) = match img {
        DynamicImage::ImageRgb8(b) => (PixelMode::RGB, b.into_raw()),
        DynamicImage::ImageLuma8(b) => (PixelMode::L, b.into_raw()),
        DynamicImage::ImageLumaA8(b) => (PixelMode::LA, b.into_raw()),
        DynamicImage::ImageRgba8(b) => (PixelMode::RGBA, b.into_raw()),
        // PIL opens 16-bit grey as I;16; other 16-bit layouts are read as their high bytes.
        DynamicImage::ImageLuma16(b) => (
            PixelMode::I16,
            b.into_raw().iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DynamicImage::ImageLumaA16(b) => (PixelMode::LA, high_bytes(&b.into_raw())),
        DynamicImage::ImageRgb16(b) => (PixelMode::RGB, high_bytes(&b.into_raw())),
        DynamicImage::ImageRgba16(b) => (PixelMode::RGBA, high_bytes(&b.into_raw())),
        other => {
            return Err(format!(
                "unsupported {name} pixel format {:?} (floating-point images are not supported)",
                other.color()
            ))
        }
    };
    if !convert_rgb && mode != PixelMode::RGB {
        return Err(format!(
            "{name} in mode {} is not RGB and do_convert_rgb is False",
            mode.name()
        ));
    }
    raw_to_rgb(&mode, width, height, &data)
}

/// What the `image` decoders may allocate. Checking the declared size is not enough: a GIF frame may be far
/// larger than its logical screen (a 375-byte file once asked for 3.8 GB), so every buffer a decoder makes is
/// held to the pixel limit too, at the widest layout it may use (16-bit RGBA, 8 bytes a pixel), twice (the
/// frame and the image it is composed into). Without a pixel limit, the decoders run unbounded.
fn decoder_limits(max_pixels: Option<u64>) -> image::Limits {
    let mut limits = image::Limits::no_limits();
    if let Some(pixels) = max_pixels {
        limits.max_alloc = Some(pixels.saturating_mul(16).saturating_add(1 << 20));
    }
    limits
}

fn high_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().map(|&x| (x >> 8) as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gif_frame_past_its_screen_is_held_to_the_pixel_limit() {
        // Found by the image fuzzer: a 7x9 logical screen whose frame asks for gigabytes.
        let bytes = include_bytes!("../../fuzz/corpus/image/gif_frame_past_screen.gif");
        // The limit refuses the frame's buffer before it is allocated.
        let err = decode(bytes, Some(1 << 20), true).unwrap_err();
        assert!(err.contains("max_image_pixels"), "{err}");
    }

    #[test]
    fn modes_convert_like_pil() {
        let rgb = |m: PixelMode, w, data: &[u8]| {
            raw_to_rgb(&m, w, 1, data).map(|i| {
                i.data
                    .chunks_exact(4)
                    .flat_map(|p| [p[0], p[1], p[2]])
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(rgb(PixelMode::L, 2, &[7, 9]).unwrap(), vec![7, 7, 7, 9, 9, 9]);
        assert_eq!(rgb(PixelMode::LA, 1, &[7, 0]).unwrap(), vec![7, 7, 7]);
        assert_eq!(rgb(PixelMode::RGBA, 1, &[1, 2, 3, 0]).unwrap(), vec![1, 2, 3]);
        let p = PixelMode::P {
            palette: vec![10, 20, 30, 40, 50, 60],
        };
        assert_eq!(
            rgb(p, 3, &[1, 0, 200]).unwrap(),
            vec![40, 50, 60, 10, 20, 30, 0, 0, 0]
        );
        assert_eq!(
            rgb(PixelMode::CMYK, 1, &[0, 0, 0, 0]).unwrap(),
            vec![255, 255, 255]
        );
        assert_eq!(rgb(PixelMode::CMYK, 1, &[255, 0, 0, 255]).unwrap(), vec![0, 0, 0]);
        assert_eq!(
            rgb(PixelMode::I16, 2, &[200, 0, 1, 1]).unwrap(),
            vec![200, 200, 200, 255, 255, 255]
        );
        assert_eq!(
            rgb(PixelMode::Bilevel, 9, &[0b1000_0001, 0x80]).unwrap()[18..],
            [0, 0, 0, 255, 255, 255, 255, 255, 255]
        );
    }

    #[test]
    fn bad_buffers_are_errors() {
        assert!(raw_to_rgb(&PixelMode::RGB, 2, 2, &[0; 11]).is_err());
        assert!(raw_to_rgb(&PixelMode::RGB, 0, 0, &[]).is_err());
        assert!(decode(b"not an image at all", None, true).is_err());
        assert!(decode(b"", None, true).is_err());
        assert!(decode(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 16], None, true).is_err());
        assert!(ImageSource::from_hwc(&[2, 2, 5], vec![0; 20]).is_err());
        assert!(ImageSource::from_hwc(&[2], vec![0; 2]).is_err());
    }
}
