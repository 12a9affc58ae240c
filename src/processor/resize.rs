//! Resampling of 8-bit RGB images (stored as 4-byte pixels) with the exact integer arithmetic of PIL's `Image.resize`.
//!
//! transformers' PIL backend resizes with `PIL.Image.resize`, so matching it bit for bit means following
//! its algorithm, not merely "a bicubic filter": a separable two-pass convolution (horizontal first, only
//! over the source rows the vertical pass will read), filter support widened by the scale factor when
//! downscaling (antialiasing), weights normalised per output pixel in f64 and then rounded to 22-bit fixed
//! point, sums started at half a unit and clipped to 0..=255. NEAREST is not a convolution in PIL: it is
//! an affine scale whose source coordinate is accumulated in f64 step by step, reproduced here step by step.

use super::buffers;
use crate::cpu::Capability;

/// PIL's resampling filters, numbered as `PIL.Image.Resampling` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    /// From the integer stored in `preprocessor_config.json` (`"resample": 3`).
    pub fn from_pil(code: i64) -> Option<Self> {
        Some(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    pub fn to_pil(self) -> i64 {
        match self {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }

    /// The filter's support radius at scale 1 (convolution filters only).
    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
            Resample::Nearest => 0.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // PIL writes these two constants as C floats.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Resample::Bicubic => {
                // Keys' cubic convolution with a = -0.5, written in the same operation order as PIL.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Resample::Nearest => 0.0,
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point precision of the weights: 32 bits minus 8 for the pixel and 2 for overshoot of the negative
/// lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output position: the first source index, the number of taps, and the taps in fixed point.
struct Kernel {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Kernel {
    fn new(in_size: usize, out_size: usize, filter: Resample) -> Kernel {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut taps = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // `as i64` truncates toward zero, as C's (int) cast does, before the clamp.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut total = 0.0;
            for (x, tap) in taps.iter_mut().enumerate().take(n) {
                let w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
                *tap = w;
                total += w;
            }
            let row = &mut weights[xx * ksize..xx * ksize + n];
            for (dst, &tap) in row.iter_mut().zip(&taps[..n]) {
                let k = if total != 0.0 { tap / total } else { tap };
                let unit = (1u32 << PRECISION_BITS) as f64;
                *dst = if k < 0.0 {
                    (-0.5 + k * unit) as i32
                } else {
                    (0.5 + k * unit) as i32
                };
            }
            bounds.push((xmin, n));
        }
        Kernel {
            ksize,
            bounds,
            weights,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + n])
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes an image of 4-byte pixels (RGB plus an unused byte, PIL's in-memory layout; four lanes per
/// tap vectorise where three would not) from `width x height` to `out_w x out_h`.
pub fn resize_rgbx(
    src: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    filter: Resample,
) -> Vec<u8> {
    if out_w == width && out_h == height {
        return src.to_vec();
    }
    if filter == Resample::Nearest {
        return nearest(src, width, height, out_w, out_h);
    }
    convolve(src, width, height, out_w, out_h, filter)
}

fn convolve(
    src: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    filter: Resample,
) -> Vec<u8> {
    let need_h = out_w != width;
    let need_v = out_h != height;
    match (need_h, need_v) {
        (true, false) => horizontal(src, width, 0..height, &Kernel::new(width, out_w, filter), out_w),
        (false, true) => vertical(src, width, 0, &Kernel::new(height, out_h, filter)),
        _ => {
            let horiz = Kernel::new(width, out_w, filter);
            let vert = Kernel::new(height, out_h, filter);
            let shrink_h = height as i64 - out_h as i64;
            let shrink_w = width as i64 - out_w as i64;
            // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
            // pixels as the width does; the order changes the intermediate rounding, so we follow it.
            if shrink_h > 0 && shrink_h > 2 * shrink_w {
                let mid = vertical(src, width, 0, &vert);
                let out = horizontal(&mid, width, 0..out_h, &horiz, out_w);
                buffers::give(mid);
                out
            } else {
                // The horizontal pass only produces the source rows the vertical pass reads.
                let first = vert.bounds.first().map_or(0, |b| b.0);
                let last = vert.bounds.last().map_or(0, |b| b.0 + b.1);
                let mid = horizontal(src, width, first..last, &horiz, out_w);
                let out = vertical(&mid, out_w, first, &vert);
                buffers::give(mid);
                out
            }
        }
    }
}

/// Horizontal pass over the given source rows (4-byte pixels). Rows go in pairs: both use the same
/// taps, so one 8-lane multiply-add serves two pixels.
#[inline(always)]
fn horizontal_impl(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    kernel: &Kernel,
    out_w: usize,
) -> Vec<u8> {
    let row_in = width * 4;
    let row_out = out_w * 4;
    let first = rows.start;
    let mut out = buffers::take(row_out * rows.len());
    let mut pairs = out.chunks_exact_mut(2 * row_out);
    for (p, out_rows) in pairs.by_ref().enumerate() {
        let r = first + 2 * p;
        let (in0, in1) = src[r * row_in..(r + 2) * row_in].split_at(row_in);
        let (out0, out1) = out_rows.split_at_mut(row_out);
        for (xx, (px0, px1)) in out0.chunks_exact_mut(4).zip(out1.chunks_exact_mut(4)).enumerate() {
            let (start, taps) = kernel.taps(xx);
            let mut acc = [HALF; 8];
            for ((&k, p0), p1) in taps
                .iter()
                .zip(in0[start * 4..].chunks_exact(4))
                .zip(in1[start * 4..].chunks_exact(4))
            {
                for c in 0..4 {
                    acc[c] += p0[c] as i32 * k;
                    acc[4 + c] += p1[c] as i32 * k;
                }
            }
            for c in 0..4 {
                px0[c] = clip8(acc[c]);
                px1[c] = clip8(acc[4 + c]);
            }
        }
    }
    let rest = pairs.into_remainder();
    if !rest.is_empty() {
        let r = rows.end - 1;
        let in_row = &src[r * row_in..(r + 1) * row_in];
        for (xx, px) in rest.chunks_exact_mut(4).enumerate() {
            let (start, taps) = kernel.taps(xx);
            let mut acc = [HALF; 4];
            for (&k, p) in taps.iter().zip(in_row[start * 4..].chunks_exact(4)) {
                for c in 0..4 {
                    acc[c] += p[c] as i32 * k;
                }
            }
            for c in 0..4 {
                px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Vertical pass; `src` holds source rows (4-byte pixels) from `row_offset` on.
#[inline(always)]
fn vertical_impl(src: &[u8], width: usize, row_offset: usize, kernel: &Kernel) -> Vec<u8> {
    let stride = width * 4;
    let out_h = kernel.bounds.len();
    let mut out = buffers::take(out_h * stride);
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (start, taps) = kernel.taps(yy);
        acc.fill(HALF);
        // Row-major accumulation: the same integer sums as PIL's column loop, in cache-friendly order.
        for (y, &k) in taps.iter().enumerate() {
            let r = start + y - row_offset;
            for (a, &p) in acc.iter_mut().zip(&src[r * stride..(r + 1) * stride]) {
                *a += p as i32 * k;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

// The passes are compiled twice: for the baseline CPU and with AVX2, picked at run time, so the
// integer multiply-adds vectorise on current CPUs without requiring them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_avx2(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    kernel: &Kernel,
    out_w: usize,
) -> Vec<u8> {
    horizontal_impl(src, width, rows, kernel, out_w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(src: &[u8], width: usize, row_offset: usize, kernel: &Kernel) -> Vec<u8> {
    vertical_impl(src, width, row_offset, kernel)
}

/// The code path the resampling passes take in this process: AVX2 where the CPU has it and the environment's
/// cap (`crate::cpu`) allows it. Both paths give the same bytes.
pub fn code_path() -> Capability {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::allows(Capability::Avx2) && std::arch::is_x86_feature_detected!("avx2") {
        return Capability::Avx2;
    }
    Capability::Default
}

fn horizontal(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    kernel: &Kernel,
    out_w: usize,
) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if code_path() == Capability::Avx2 {
        // SAFETY: the CPU supports AVX2 (checked by code_path).
        return unsafe { horizontal_avx2(src, width, rows, kernel, out_w) };
    }
    horizontal_impl(src, width, rows, kernel, out_w)
}

fn vertical(src: &[u8], width: usize, row_offset: usize, kernel: &Kernel) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if code_path() == Capability::Avx2 {
        // SAFETY: the CPU supports AVX2 (checked by code_path).
        return unsafe { vertical_avx2(src, width, row_offset, kernel) };
    }
    vertical_impl(src, width, row_offset, kernel)
}

/// PIL's NEAREST: source coordinates accumulate `in/out` in f64 from half a step, then truncate.
fn nearest(src: &[u8], width: usize, height: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    fn table(in_size: usize, out_size: usize) -> Vec<Option<usize>> {
        let step = in_size as f64 / out_size as f64;
        let mut pos = step * 0.5;
        (0..out_size)
            .map(|_| {
                let i = if pos < 0.0 { None } else { Some(pos as usize) };
                pos += step;
                i.filter(|&i| i < in_size)
            })
            .collect()
    }
    let xs = table(width, out_w);
    let ys = table(height, out_h);
    let mut out = buffers::take(out_w * out_h * 4);
    for (row, y) in out.chunks_exact_mut(out_w * 4).zip(ys) {
        let Some(y) = y else { continue };
        let in_row = &src[y * width * 4..(y + 1) * width * 4];
        for (px, x) in row.chunks_exact_mut(4).zip(&xs) {
            if let Some(x) = *x {
                px.copy_from_slice(&in_row[x * 4..x * 4 + 4]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..5 * 4 * 4).map(|i| (i * 7 % 256) as u8).collect();
        for f in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Nearest,
            Resample::Lanczos,
        ] {
            assert_eq!(resize_rgbx(&src, 5, 4, 5, 4, f), src);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![200u8; 37 * 23 * 4];
        for f in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Hamming,
            Resample::Box,
            Resample::Lanczos,
        ] {
            for (w, h) in [(384, 384), (10, 7), (37, 50)] {
                let out = resize_rgbx(&src, 37, 23, w, h, f);
                assert_eq!(out.len(), w * h * 4);
                assert!(out.iter().all(|&v| v == 200), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 384), (100, 384), (384, 384), (1000, 3)] {
            let k = Kernel::new(i, o, Resample::Bicubic);
            for xx in 0..o {
                let s: i32 = k.taps(xx).1.iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.ksize as i32,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    /// The AVX2 build of the passes gives the baseline build's bytes (`BLIP_PEFT_CPU_CAPABILITY=default`
    /// picks the baseline one at run time).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_passes_equal_the_baseline_passes() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let (w, h) = (97, 61);
        let src: Vec<u8> = (0..w * h * 4).map(|i| (i * 131 % 251) as u8).collect();
        for f in [Resample::Bicubic, Resample::Bilinear, Resample::Lanczos] {
            let kernel = Kernel::new(w, 40, f);
            // SAFETY: AVX2 was detected above.
            let fast = unsafe { horizontal_avx2(&src, w, 0..h, &kernel, 40) };
            assert_eq!(fast, horizontal_impl(&src, w, 0..h, &kernel, 40), "{f:?}");
            let kernel = Kernel::new(h, 23, f);
            // SAFETY: as above.
            let fast = unsafe { vertical_avx2(&src, w, 0, &kernel) };
            assert_eq!(fast, vertical_impl(&src, w, 0, &kernel), "{f:?}");
        }
    }

    #[test]
    fn nearest_picks_pil_source_pixels() {
        // 4 -> 2 samples source pixels 1 and 3 (centres 1.0 and 3.0).
        let src: Vec<u8> = (0..4u8).flat_map(|v| [v, v, v, 0]).collect();
        assert_eq!(
            resize_rgbx(&src, 4, 1, 2, 1, Resample::Nearest),
            vec![1, 1, 1, 0, 3, 3, 3, 0]
        );
    }
}
