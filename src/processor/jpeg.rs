//! JPEG decoding as Pillow decodes it.
//!
//! Pillow reads JPEGs through libjpeg-turbo with libjpeg's defaults: the accurate integer IDCT
//! (`JDCT_ISLOW`), fancy (triangle-filter) chroma upsampling, libjpeg's integer YCbCr -> RGB tables. We run
//! the same decoder: mozjpeg's, a libjpeg-turbo fork whose changes are all on the encoding side, built from
//! source by `mozjpeg-sys` (its C code paths, which libjpeg-turbo keeps bit-exact with its SIMD ones). The
//! pixels therefore equal `np.asarray(Image.open(path))`, which transformers' processors start from.
//!
//! What this file adds around libjpeg: errors become `Err(String)` (libjpeg's `error_exit` unwinds to
//! [`decode`], compiled with `-fexceptions`), a truncated or damaged stream is an error rather than the
//! grey fill libjpeg substitutes (see [`emit_message`]), the pixel limit is checked between the header and the first allocation, and the
//! number of scans is bounded so a small progressive file cannot make us decode the image thousands of
//! times.

use std::ffi::c_int;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use mozjpeg_sys as ffi;

use super::image::PixelMode;

/// More scans than any encoder writes (libjpeg's progressive scripts use ~10); libjpeg-turbo's own
/// fuzzers stop at 500 for the same reason: each scan revisits the whole image.
pub const MAX_SCANS: c_int = 1000;

/// The decoded pixels in the layout Pillow opens the file in: `L` (1 component), `RGBX` (3, any colour
/// transform, alpha byte 255) or `CMYK` (4, with Adobe's inverted ink turned into PIL's polarity).
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    pub mode: PixelMode,
    pub data: Vec<u8>,
}

/// A libjpeg error carried through the unwind out of `error_exit`.
struct JpegError(String);

/// Decodes a whole JPEG file. `check_size(width, height)` runs after the header is read, before libjpeg
/// allocates anything for the image.
pub fn decode(
    bytes: &[u8],
    check_size: impl FnOnce(usize, usize) -> Result<(), String>,
) -> Result<Decoded, String> {
    let mut decompressor = Decompressor::new();
    match catch_unwind(AssertUnwindSafe(|| decompressor.run(bytes, check_size))) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<JpegError>() {
            Ok(e) => Err(format!("cannot decode JPEG: {}", e.0)),
            Err(other) => resume_unwind(other),
        },
    }
}

/// libjpeg's decompression state and the managers it points to, boxed so the pointers stay valid.
struct Decompressor {
    cinfo: Box<ffi::jpeg_decompress_struct>,
    _err: Box<ffi::jpeg_error_mgr>,
    _progress: Box<ffi::jpeg_progress_mgr>,
}

impl Decompressor {
    fn new() -> Self {
        // SAFETY: libjpeg's structs are plain C data for which all-zero is the documented starting state;
        // `jpeg_std_error` fills the error manager before `jpeg_create_decompress` (which cannot fail
        // here: it only checks the struct size and library version, both fixed at build time) uses it.
        unsafe {
            let mut err: Box<ffi::jpeg_error_mgr> = Box::new(std::mem::zeroed());
            ffi::jpeg_std_error(&mut err);
            err.error_exit = Some(error_exit);
            err.emit_message = Some(emit_message);
            err.output_message = Some(output_message);
            let mut progress: Box<ffi::jpeg_progress_mgr> = Box::new(std::mem::zeroed());
            progress.progress_monitor = Some(limit_scans);
            let mut cinfo: Box<ffi::jpeg_decompress_struct> = Box::new(std::mem::zeroed());
            cinfo.common.err = &mut *err;
            ffi::jpeg_create_decompress(&mut *cinfo);
            cinfo.common.progress = &mut *progress;
            Decompressor {
                cinfo,
                _err: err,
                _progress: progress,
            }
        }
    }

    fn run(
        &mut self,
        bytes: &[u8],
        check_size: impl FnOnce(usize, usize) -> Result<(), String>,
    ) -> Result<Decoded, String> {
        let len =
            std::ffi::c_ulong::try_from(bytes.len()).map_err(|_| "cannot decode JPEG: file too large")?;
        let cinfo = &mut *self.cinfo;
        // SAFETY: `bytes` outlives the decompressor's use of it (this call); every libjpeg error unwinds
        // out of these calls into `decode`, and `Drop` releases libjpeg's memory whatever state it is in.
        unsafe {
            ffi::jpeg_mem_src(cinfo, bytes.as_ptr(), len);
            ffi::jpeg_read_header(cinfo, 1);
        }
        let (width, height) = (cinfo.image_width as usize, cinfo.image_height as usize);
        check_size(width, height)?;
        let (out_space, mode, channels) = match cinfo.num_components {
            1 => (ffi::J_COLOR_SPACE::JCS_GRAYSCALE, PixelMode::L, 1),
            3 => (ffi::J_COLOR_SPACE::JCS_EXT_RGBX, PixelMode::RGBX, 4),
            4 => (ffi::J_COLOR_SPACE::JCS_CMYK, PixelMode::CMYK, 4),
            n => {
                return Err(format!(
                    "cannot decode JPEG: {n} colour components are not supported"
                ))
            }
        };
        cinfo.out_color_space = out_space;
        let row = width * channels;
        let mut data = super::buffers::take(row * height);
        // SAFETY: as above; each scanline pointer addresses one `row`-byte row of `data`, which libjpeg
        // fills (output size = image size: no scaling is requested).
        unsafe {
            ffi::jpeg_start_decompress(cinfo);
            if cinfo.output_width as usize != width
                || cinfo.output_height as usize != height
                || cinfo.output_components as usize != channels
            {
                return Err("cannot decode JPEG: unexpected output size".into());
            }
            while (cinfo.output_scanline as usize) < height {
                let mut line = data[cinfo.output_scanline as usize * row..].as_mut_ptr();
                if ffi::jpeg_read_scanlines(cinfo, &mut line, 1) == 0 {
                    return Err("cannot decode JPEG: the decoder stopped early".into());
                }
            }
            ffi::jpeg_finish_decompress(cinfo);
        }
        if mode == PixelMode::CMYK {
            // Pillow opens every 4-component JPEG as "CMYK;I" (Adobe's convention: 0 = full ink).
            data.iter_mut().for_each(|v| *v = 255 - *v);
        }
        Ok(Decoded {
            width,
            height,
            mode,
            data,
        })
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the struct was initialised by `jpeg_create_decompress`; destroying is valid in any state.
        unsafe { ffi::jpeg_destroy_decompress(&mut self.cinfo) }
    }
}

/// libjpeg's text for its current message.
fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    let mut buffer = [0u8; 80];
    // SAFETY: `err` is the manager `jpeg_std_error` filled; `format_message` writes at most
    // JMSG_LENGTH_MAX (80) bytes, NUL-terminated, into the buffer (declared `&[u8; 80]` by the bindings,
    // written through all the same, as the C signature says).
    unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            let format: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, &mut [u8; 80]) =
                std::mem::transmute(format);
            format(cinfo, &mut buffer);
        }
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    resume_unwind(Box::new(JpegError(message(cinfo))))
}

/// Warnings (`level` -1) that say the entropy-coded data is damaged end the decoding: libjpeg would go on
/// and fill what it cannot read with grey or garbage (Pillow ignores these warnings and returns that
/// image; a silently wrong image is worse than an error here). Harmless ones (extraneous bytes before a
/// marker, an unknown JFIF version, a bad ICC chunk) are ignored, as Pillow ignores them.
unsafe extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    if level >= 0 {
        return;
    }
    // SAFETY: `err` is our manager (see `Decompressor::new`).
    let code = unsafe { (*cinfo.err).msg_code };
    let damaged = [
        ffi::JWRN_JPEG_EOF,
        ffi::JWRN_HIT_MARKER,
        ffi::JWRN_HUFF_BAD_CODE,
        ffi::JWRN_MUST_RESYNC,
        ffi::JWRN_NOT_SEQUENTIAL,
        ffi::JWRN_BOGUS_PROGRESSION,
    ];
    // (The bindings do not number JWRN_ARITH_BAD_CODE; it is known by its text.)
    if damaged.iter().any(|&c| c as c_int == code) || message(cinfo).contains("bad arithmetic code") {
        let what = if code == ffi::JWRN_JPEG_EOF as c_int {
            "image file is truncated".to_string()
        } else {
            format!("{} (the file is damaged)", message(cinfo))
        };
        resume_unwind(Box::new(JpegError(what)))
    }
}

/// Nothing is printed: every message that matters becomes the error.
unsafe extern "C-unwind" fn output_message(_cinfo: &mut ffi::jpeg_common_struct) {}

/// libjpeg calls the progress monitor while it reads a multi-scan file's scans.
unsafe extern "C-unwind" fn limit_scans(cinfo: &mut ffi::jpeg_common_struct) {
    if cinfo.is_decompressor == 0 {
        return;
    }
    // SAFETY: a decompressor's common fields are the first member of its `jpeg_decompress_struct`.
    let scans = unsafe {
        (*(cinfo as *mut ffi::jpeg_common_struct as *mut ffi::jpeg_decompress_struct)).input_scan_number
    };
    if scans > MAX_SCANS {
        resume_unwind(Box::new(JpegError(format!(
            "more than {MAX_SCANS} scans; no encoder writes that many, the file is likely crafted to \
             take excessive time"
        ))))
    }
}
