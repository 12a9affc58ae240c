//! Training-time image augmentation: the BLIP authors' recipe (LAVIS's `blip_image_train`:
//! RandomResizedCrop(scale 0.5-1.0, bicubic), a horizontal flip, RandAugment(2 operations, magnitude 5) over
//! Identity, AutoContrast, Brightness, Sharpness, Equalize, ShearX/Y, TranslateX/Y, Rotate) on 8-bit RGB
//! images of 4-byte pixels, run per image on the batch-preparation threads.
//!
//! Each image's draws come from its own random stream keyed by (run seed, epoch, example index), so the
//! images of a run do not depend on the thread that prepares them, on `num_workers`, or on where a resumed
//! run starts. What is drawn for an image is a list of [`Op`]s ([`plan`]); applying them ([`apply`]) is
//! deterministic and each operation is defined as PIL (or torchvision on PIL images) computes it:
//!
//! * the crop box: torchvision's `RandomResizedCrop.get_params` (10 tries, then the central fallback),
//!   with our own random numbers; crop then resize is PIL's `img.crop(box).resize(size, resample)`
//!   (torchvision's `resized_crop` on a PIL image), bit for bit, as the plain pipeline's resize is;
//! * the flip: `Image.transpose(FLIP_LEFT_RIGHT)`;
//! * AutoContrast, Equalize: `ImageOps.autocontrast` / `ImageOps.equalize`;
//! * Brightness, Sharpness: `ImageEnhance.Brightness` / `ImageEnhance.Sharpness` (PIL's float32 blend,
//!   truncated, and its SMOOTH filter with borders copied);
//! * ShearX/Y, TranslateX/Y, Rotate: LAVIS's geometry (the matrices of its `cv2.warpAffine` calls, pixel
//!   centres at integer coordinates, rotation about (W/2, H/2), grey 128 fill), resampled as PIL's
//!   `Image.transform(size, AFFINE, data, BILINEAR, fillcolor)` resamples (LAVIS resamples with OpenCV's
//!   fixed-point bilinear instead, which rounds differently and blends the fill into edge pixels).
//!
//! At magnitude 5 (the recipe's) Brightness and Sharpness have factor 1.0 and leave the image as it is, in
//! LAVIS as here; other magnitudes give LAVIS's other factors.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::image::RgbImage;
use super::resize::{resize_rgbx, Resample};
use crate::error::{Error, Result};

/// RandAugment's magnitude scale: LAVIS's `MAX_LEVEL`.
pub const MAX_LEVEL: f64 = 10.0;
/// LAVIS's `translate_const`: the translation at full magnitude, in pixels.
pub const TRANSLATE_CONST: f64 = 10.0;
/// The grey LAVIS fills uncovered pixels with after a geometric operation.
pub const FILL: u8 = 128;

/// The RandAugment operations, by LAVIS's names.
pub const OPERATIONS: [&str; 10] = [
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
];

/// The augmentation settings (`train(augment=...)`); the defaults are the BLIP recipe (`augment="blip"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Crop a random box and resize it to the processor's size (otherwise: the processor's plain resize).
    pub random_resized_crop: bool,
    /// The box's area as a fraction of the image's: drawn uniformly in [low, high].
    pub scale: [f64; 2],
    /// The box's aspect ratio (width / height): drawn log-uniformly in [low, high].
    pub ratio: [f64; 2],
    /// Probability of a horizontal flip (never for images whose caption names a side: see
    /// [`names_a_side`]).
    pub flip_probability: f64,
    /// RandAugment's N: operations drawn per image (with replacement).
    pub randaugment_ops: usize,
    /// RandAugment's M, 0..=10.
    pub randaugment_magnitude: f64,
    /// The probability each drawn operation is applied (LAVIS: 0.5).
    pub randaugment_probability: f64,
    /// The operations drawn from, by name (a subset of [`OPERATIONS`]).
    pub randaugment_operations: Vec<String>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            random_resized_crop: true,
            scale: [0.5, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip_probability: 0.5,
            randaugment_ops: 2,
            randaugment_magnitude: 5.0,
            randaugment_probability: 0.5,
            randaugment_operations: OPERATIONS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl AugmentConfig {
    /// Settings from `train(augment=...)`'s dict (keys over the recipe's defaults), checked.
    pub fn from_keywords(keywords: Value) -> Result<Self> {
        let config: Self = crate::config::settings_from_keywords(keywords, "augment")?;
        config.validate()?;
        Ok(config)
    }

    /// Every setting's range, each error naming its setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, msg: String| Err(Error::invalid(format!("augment argument {name}: {msg}")));
        let [s0, s1] = self.scale;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return bad(
                "scale",
                format!("needs 0 < low <= high <= 1 (fractions of the image's area), got [{s0}, {s1}]"),
            );
        }
        let [r0, r1] = self.ratio;
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return bad(
                "ratio",
                format!("needs 0 < low <= high (finite aspect ratios, width / height), got [{r0}, {r1}]"),
            );
        }
        for (name, p) in [
            ("flip_probability", self.flip_probability),
            ("randaugment_probability", self.randaugment_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(name, format!("must be a probability in [0, 1], got {p}"));
            }
        }
        let m = self.randaugment_magnitude;
        if !(0.0..=MAX_LEVEL).contains(&m) {
            return bad(
                "randaugment_magnitude",
                format!("must be in [0, 10] (RandAugment's M), got {m}"),
            );
        }
        if self.randaugment_ops > 0 && self.randaugment_operations.is_empty() {
            return bad(
                "randaugment_operations",
                "is empty while randaugment_ops > 0; name operations or set randaugment_ops=0".into(),
            );
        }
        if let Some(name) = self
            .randaugment_operations
            .iter()
            .find(|n| operation(n).is_none())
        {
            return bad(
                "randaugment_operations",
                format!(
                    "unknown operation {name:?}; the operations are {}",
                    OPERATIONS.join(", ")
                ),
            );
        }
        Ok(())
    }
}

/// One deterministic step of an image's augmentation, with its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum Op {
    /// PIL's `img.crop((left, top, left + width, top + height)).resize((out_width, out_height), resample)`.
    ResizedCrop {
        top: usize,
        left: usize,
        height: usize,
        width: usize,
        out_height: usize,
        out_width: usize,
        /// PIL's resampling filter number (3: bicubic).
        resample: i64,
    },
    /// `Image.transpose(FLIP_LEFT_RIGHT)`.
    Flip,
    Identity,
    /// `ImageOps.autocontrast(img)`.
    AutoContrast,
    /// `ImageOps.equalize(img)`.
    Equalize,
    /// `ImageEnhance.Brightness(img).enhance(factor)`.
    Brightness {
        factor: f64,
    },
    /// `ImageEnhance.Sharpness(img).enhance(factor)`.
    Sharpness {
        factor: f64,
    },
    /// LAVIS's `shear_x_func`: the source x of output pixel (x, y) is `x - factor * y`.
    ShearX {
        factor: f64,
    },
    /// LAVIS's `shear_y_func`: the source y of output pixel (x, y) is `y - factor * x`.
    ShearY {
        factor: f64,
    },
    /// LAVIS's `translate_x_func`: the source x is `x + offset`.
    TranslateX {
        offset: f64,
    },
    /// LAVIS's `translate_y_func`: the source y is `y + offset`.
    TranslateY {
        offset: f64,
    },
    /// LAVIS's `rotate_func`: counter-clockwise by `degrees` about (W/2, H/2) (OpenCV's
    /// `getRotationMatrix2D`).
    Rotate {
        degrees: f64,
    },
    /// PIL's `Image.transform(size, AFFINE, data, BILINEAR, fillcolor=(fill,) * 3)`: output pixel centre
    /// (u, v) (half-integers) reads the source at (a u + b v + c, d u + e v + f).
    Affine {
        data: [f64; 6],
        fill: u8,
    },
}

/// The index of a RandAugment operation by name.
fn operation(name: &str) -> Option<usize> {
    OPERATIONS.iter().position(|&n| n == name)
}

/// Whether a caption names a side, so that a horizontal flip would make it wrong: a word (letters and
/// digits between other characters, case ignored) that starts with "left" or "right" (left, right,
/// leftmost, right-hand, ...) or contains "clockwise" (clockwise, counterclockwise, anticlockwise). Such
/// images are never flipped; everything else about their augmentation stays. ("right" as in "all right"
/// also blocks the flip: a flip skipped costs little, a caption made false teaches the wrong thing, which
/// is why we skip rather than swap the words.)
pub fn names_a_side(caption: &str) -> bool {
    caption
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .any(|w| {
            let w = w.to_lowercase();
            w.starts_with("left") || w.starts_with("right") || w.contains("clockwise")
        })
}

/// A splitmix64 stream: one per (run seed, epoch, example index).
#[derive(Clone, Debug)]
pub struct Stream(u64);

impl Stream {
    pub fn new(seed: i64, epoch: i64, index: usize) -> Self {
        let mut s = Stream((seed as u64) ^ 0xA076_1D64_78BD_642F);
        let a = s.next_u64() ^ (epoch as u64).wrapping_mul(0xE703_7ED1_A0B4_28DB);
        let mut s = Stream(a);
        let b = s.next_u64() ^ (index as u64).wrapping_mul(0x8EBC_6AF0_9C88_C6E3);
        Stream(b)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [low, high).
    pub fn uniform_in(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.uniform()
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// torchvision's `RandomResizedCrop.get_params` for an image of `width x height`: (top, left, height, width).
pub fn crop_box(
    width: usize,
    height: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut Stream,
) -> [usize; 4] {
    let area = (width * height) as f64;
    let (lo, hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.uniform_in(scale[0], scale[1]);
        let aspect = rng.uniform_in(lo, hi).exp();
        // Python's round(): halves to even.
        let w = (target * aspect).sqrt().round_ties_even();
        let h = (target / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
            let (w, h) = (w as usize, h as usize);
            let top = rng.below(height - h + 1);
            let left = rng.below(width - w + 1);
            return [top, left, h, w];
        }
    }
    // The central crop torchvision falls back to.
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (
            width,
            ((width as f64 / ratio[0]).round_ties_even() as usize).min(height),
        )
    } else if in_ratio > ratio[1] {
        (
            ((height as f64 * ratio[1]).round_ties_even() as usize).min(width),
            height,
        )
    } else {
        (width, height)
    };
    [(height - h) / 2, (width - w) / 2, h, w]
}

/// What an image of `width x height` gets: the random crop (or the plain resize) to `out`, the flip,
/// then the RandAugment operations, drawn from `rng`. `flip_allowed` false (a caption naming a side)
/// never flips.
pub fn plan(
    cfg: &AugmentConfig,
    width: usize,
    height: usize,
    out: (usize, usize),
    resample: Resample,
    flip_allowed: bool,
    rng: &mut Stream,
) -> Vec<Op> {
    let (out_height, out_width) = out;
    let [top, left, h, w] = if cfg.random_resized_crop {
        crop_box(width, height, cfg.scale, cfg.ratio, rng)
    } else {
        [0, 0, height, width]
    };
    let mut ops = vec![Op::ResizedCrop {
        top,
        left,
        height: h,
        width: w,
        out_height,
        out_width,
        resample: resample.to_pil(),
    }];
    // Drawn whatever the caption, so the other draws do not depend on it.
    let flip = rng.uniform() < cfg.flip_probability;
    if flip && flip_allowed {
        ops.push(Op::Flip);
    }
    let level = cfg.randaugment_magnitude / MAX_LEVEL;
    for _ in 0..cfg.randaugment_ops {
        let name = &cfg.randaugment_operations[rng.below(cfg.randaugment_operations.len())];
        // LAVIS skips an operation when its draw is above the probability.
        if rng.uniform() > cfg.randaugment_probability {
            continue;
        }
        // LAVIS's signs: shear and translate negative when a draw is above 0.5, rotate below 0.5.
        let mut signed = |v: f64, negative_above: bool| {
            let r = rng.uniform();
            if (r > 0.5) == negative_above {
                -v
            } else {
                v
            }
        };
        let op = match name.as_str() {
            "AutoContrast" => Op::AutoContrast,
            "Equalize" => Op::Equalize,
            "Brightness" => Op::Brightness {
                factor: level * 1.8 + 0.1,
            },
            "Sharpness" => Op::Sharpness {
                factor: level * 1.8 + 0.1,
            },
            "ShearX" => Op::ShearX {
                factor: signed(level * 0.3, true),
            },
            "ShearY" => Op::ShearY {
                factor: signed(level * 0.3, true),
            },
            "TranslateX" => Op::TranslateX {
                offset: signed(level * TRANSLATE_CONST, true),
            },
            "TranslateY" => Op::TranslateY {
                offset: signed(level * TRANSLATE_CONST, true),
            },
            "Rotate" => Op::Rotate {
                degrees: signed(level * 30.0, false),
            },
            _ => Op::Identity,
        };
        ops.push(op);
    }
    ops
}

/// Applies `ops` in order.
pub fn apply(mut image: RgbImage, ops: &[Op]) -> Result<RgbImage> {
    for op in ops {
        image = apply_op(image, op)?;
    }
    Ok(image)
}

/// One operation (see [`Op`] for what each computes).
pub fn apply_op(image: RgbImage, op: &Op) -> Result<RgbImage> {
    Ok(match *op {
        Op::ResizedCrop {
            top,
            left,
            height,
            width,
            out_height,
            out_width,
            resample,
        } => {
            let filter = Resample::from_pil(resample).ok_or_else(|| {
                Error::invalid(format!(
                    "resample must be a PIL filter number 0-5, got {resample}"
                ))
            })?;
            if height == 0 || width == 0 || top + height > image.height || left + width > image.width {
                return Err(Error::invalid(format!(
                    "crop box (top {top}, left {left}, {height}x{width}) is outside the {}x{} image",
                    image.height, image.width
                )));
            }
            if out_height == 0 || out_width == 0 {
                return Err(Error::invalid("the crop's output size must be positive"));
            }
            resized_crop(
                &image,
                [top, left, height, width],
                (out_height, out_width),
                filter,
            )
        }
        Op::Flip => flip(image),
        Op::Identity => image,
        Op::AutoContrast => autocontrast(image),
        Op::Equalize => equalize(image),
        Op::Brightness { factor } => brightness(image, check_factor(factor)?),
        Op::Sharpness { factor } => sharpness(image, check_factor(factor)?),
        Op::ShearX { factor } => {
            let data = lavis_matrix([1.0, -factor, 0.0, 0.0, 1.0, 0.0]);
            affine(&image, check_data(data)?, FILL)
        }
        Op::ShearY { factor } => {
            let data = lavis_matrix([1.0, 0.0, 0.0, -factor, 1.0, 0.0]);
            affine(&image, check_data(data)?, FILL)
        }
        Op::TranslateX { offset } => {
            let data = lavis_matrix([1.0, 0.0, offset, 0.0, 1.0, 0.0]);
            affine(&image, check_data(data)?, FILL)
        }
        Op::TranslateY { offset } => {
            let data = lavis_matrix([1.0, 0.0, 0.0, 0.0, 1.0, offset]);
            affine(&image, check_data(data)?, FILL)
        }
        Op::Rotate { degrees } => {
            let data = rotation(image.width, image.height, degrees);
            affine(&image, check_data(data)?, FILL)
        }
        Op::Affine { data, fill } => affine(&image, check_data(data)?, fill),
    })
}

fn check_factor(factor: f64) -> Result<f32> {
    if factor.is_finite() {
        Ok(factor as f32)
    } else {
        Err(Error::invalid(format!(
            "an enhancement factor must be finite, got {factor}"
        )))
    }
}

fn check_data(data: [f64; 6]) -> Result<[f64; 6]> {
    if data.iter().all(|v| v.is_finite()) {
        Ok(data)
    } else {
        Err(Error::invalid(format!(
            "an affine transform must be finite, got {data:?}"
        )))
    }
}

/// A source-from-output map in OpenCV's convention (pixel centres at integer coordinates:
/// `src = [a b c; d e f] * (x, y, 1)`) as PIL's `AFFINE` data (centres at half-integers).
pub fn lavis_matrix(m: [f64; 6]) -> [f64; 6] {
    let [a, b, c, d, e, f] = m;
    [
        a,
        b,
        c + 0.5 - 0.5 * a - 0.5 * b,
        d,
        e,
        f + 0.5 - 0.5 * d - 0.5 * e,
    ]
}

/// LAVIS's rotation (OpenCV's `getRotationMatrix2D((W/2, H/2), degrees, 1)`, inverted by `warpAffine`) as
/// PIL's `AFFINE` data.
pub fn rotation(width: usize, height: usize, degrees: f64) -> [f64; 6] {
    let t = degrees.to_radians();
    let (s, c) = t.sin_cos();
    let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
    // src = R^T (dst - centre) + centre, R^T = [cos, -sin; sin, cos].
    lavis_matrix([c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy])
}

/// Crop then resize (PIL's `crop(box).resize(size, filter)`).
pub fn resized_crop(image: &RgbImage, bx: [usize; 4], out: (usize, usize), filter: Resample) -> RgbImage {
    let [top, left, h, w] = bx;
    let (out_h, out_w) = out;
    let row = image.width * 4;
    let mut crop = Vec::with_capacity(w * h * 4);
    for y in top..top + h {
        crop.extend_from_slice(&image.data[y * row + left * 4..y * row + (left + w) * 4]);
    }
    let data = resize_rgbx(&crop, w, h, out_w, out_h, filter);
    RgbImage {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Mirrors left and right.
pub fn flip(mut image: RgbImage) -> RgbImage {
    let row = image.width * 4;
    if row > 0 {
        for line in image.data.chunks_exact_mut(row) {
            let (mut i, mut j) = (0, image.width.saturating_sub(1));
            while i < j {
                for k in 0..4 {
                    line.swap(i * 4 + k, j * 4 + k);
                }
                i += 1;
                j -= 1;
            }
        }
    }
    image
}

/// Per-channel histograms of the three colour bands.
fn histograms(image: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for px in image.data.chunks_exact(4) {
        for b in 0..3 {
            h[b][px[b] as usize] += 1;
        }
    }
    h
}

/// Maps each colour band through its table (PIL's `Image.point` with 8-bit tables).
fn map_bands(mut image: RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    for px in image.data.chunks_exact_mut(4) {
        for b in 0..3 {
            px[b] = luts[b][px[b] as usize];
        }
    }
    image
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// `ImageOps.autocontrast(image)` (no cutoff): each band stretched from its lowest to its highest value.
pub fn autocontrast(image: RgbImage) -> RgbImage {
    let hist = histograms(&image);
    let luts = hist.map(|h| {
        let lo = h.iter().position(|&c| c > 0);
        let hi = h.iter().rposition(|&c| c > 0);
        match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                std::array::from_fn(|i| {
                    // Python's int(): toward zero.
                    let v = (i as f64 * scale + offset) as i64;
                    v.clamp(0, 255) as u8
                })
            }
            _ => identity_lut(),
        }
    });
    map_bands(image, &luts)
}

/// `ImageOps.equalize(image)`.
pub fn equalize(image: RgbImage) -> RgbImage {
    let hist = histograms(&image);
    let luts = hist.map(|h| {
        let used: Vec<u64> = h.iter().copied().filter(|&c| c > 0).collect();
        if used.len() <= 1 {
            return identity_lut();
        }
        let step = (used.iter().sum::<u64>() - used[used.len() - 1]) / 255;
        if step == 0 {
            return identity_lut();
        }
        let mut n = step / 2;
        let mut lut = [0u8; 256];
        for (i, entry) in lut.iter_mut().enumerate() {
            // PIL's point() clips the table's entries to 0..=255.
            *entry = (n / step).min(255) as u8;
            n += h[i];
        }
        lut
    });
    map_bands(image, &luts)
}

/// PIL's `Image.blend(a, b, alpha)` for one 8-bit value: `a + alpha * (b - a)` in float32, clipped to
/// 0..=255 and truncated.
#[inline]
fn blend(a: u8, b: u8, alpha: f32) -> u8 {
    let v = a as i32 as f32 + alpha * (b as i32 - a as i32) as f32;
    if v <= 0.0 {
        0
    } else if v >= 255.0 {
        255
    } else {
        v as u8
    }
}

/// `ImageEnhance.Brightness(image).enhance(factor)`: a blend from black.
pub fn brightness(mut image: RgbImage, factor: f32) -> RgbImage {
    let lut: [u8; 256] = std::array::from_fn(|v| blend(0, v as u8, factor));
    for px in image.data.chunks_exact_mut(4) {
        for b in 0..3 {
            px[b] = lut[px[b] as usize];
        }
    }
    image
}

/// PIL's `ImageFilter.SMOOTH` (3x3, weights 1 around 5, over 13, rounded); the border pixels are copied.
fn smooth(image: &RgbImage) -> Vec<u8> {
    let (w, h) = (image.width, image.height);
    let mut out = image.data.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let src = &image.data;
    let at = |x: usize, y: usize, b: usize| src[(y * w + x) * 4 + b] as u32;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for b in 0..3 {
                let mut sum = 4 * at(x, y, b);
                for (dx, dy) in [
                    (0, 0),
                    (1, 0),
                    (2, 0),
                    (0, 1),
                    (1, 1),
                    (2, 1),
                    (0, 2),
                    (1, 2),
                    (2, 2),
                ] {
                    sum += at(x + dx - 1, y + dy - 1, b);
                }
                // round(sum / 13): never a tie, 13 being odd.
                out[(y * w + x) * 4 + b] = ((2 * sum + 13) / 26) as u8;
            }
        }
    }
    out
}

/// `ImageEnhance.Sharpness(image).enhance(factor)`: a blend from the SMOOTH-filtered image.
pub fn sharpness(mut image: RgbImage, factor: f32) -> RgbImage {
    let degenerate = smooth(&image);
    for (px, d) in image.data.chunks_exact_mut(4).zip(degenerate.chunks_exact(4)) {
        for b in 0..3 {
            px[b] = blend(d[b], px[b], factor);
        }
    }
    image
}

/// PIL's `Image.transform(size, AFFINE, data, BILINEAR, fillcolor=(fill,) * 3)` on an RGB image: each
/// output pixel centre maps to a source point; points outside the image get `fill`, the others are
/// interpolated from the (edge-clamped) neighbours in f64 and truncated, as PIL's `bilinear_filter32RGB`.
pub fn affine(image: &RgbImage, data: [f64; 6], fill: u8) -> RgbImage {
    let (w, h) = (image.width, image.height);
    let [a0, a1, a2, a3, a4, a5] = data;
    let src = &image.data;
    let mut out = vec![0u8; w * h * 4];
    let clip_x = |x: i64| x.clamp(0, w as i64 - 1) as usize;
    for y in 0..h {
        for x in 0..w {
            let (u, v) = (x as f64 + 0.5, y as f64 + 0.5);
            let xin = a0 * u + a1 * v + a2;
            let yin = a3 * u + a4 * v + a5;
            let o = (y * w + x) * 4;
            if !(xin >= 0.0 && xin < w as f64 && yin >= 0.0 && yin < h as f64) {
                out[o..o + 3].fill(fill);
                continue;
            }
            let (xin, yin) = (xin - 0.5, yin - 0.5);
            let (xf, yf) = (xin.floor(), yin.floor());
            let (dx, dy) = (xin - xf, yin - yf);
            let (xi, yi) = (xf as i64, yf as i64);
            let (x0, x1) = (clip_x(xi), clip_x(xi + 1));
            let row0 = yi.clamp(0, h as i64 - 1) as usize;
            let row1 = (yi + 1 >= 0 && yi + 1 < h as i64).then_some((yi + 1) as usize);
            for b in 0..3 {
                let p = |r: usize, c: usize| src[(r * w + c) * 4 + b] as f64;
                let top = p(row0, x0) + (p(row0, x1) - p(row0, x0)) * dx;
                let bottom = match row1 {
                    Some(r) => p(r, x0) + (p(r, x1) - p(r, x0)) * dx,
                    None => top,
                };
                out[o + b] = (top + (bottom - top) * dy) as u8;
            }
        }
    }
    RgbImage {
        width: w,
        height: h,
        data: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: usize, h: usize) -> RgbImage {
        let mut rng = Stream::new(1, 2, 3);
        RgbImage {
            width: w,
            height: h,
            data: (0..w * h * 4).map(|_| rng.below(256) as u8).collect(),
        }
    }

    #[test]
    fn the_recipe_validates_and_bad_settings_are_named() {
        AugmentConfig::default().validate().unwrap();
        let c = AugmentConfig::from_keywords(serde_json::json!({})).unwrap();
        assert_eq!(c, AugmentConfig::default());
        for (kw, name) in [
            (serde_json::json!({"scale": [0.0, 1.0]}), "scale"),
            (serde_json::json!({"ratio": [2.0, 1.0]}), "ratio"),
            (serde_json::json!({"flip_probability": 1.5}), "flip_probability"),
            (
                serde_json::json!({"randaugment_magnitude": 11}),
                "randaugment_magnitude",
            ),
            (
                serde_json::json!({"randaugment_operations": ["Solarise"]}),
                "randaugment_operations",
            ),
        ] {
            let err = AugmentConfig::from_keywords(kw).unwrap_err().to_string();
            assert!(err.starts_with(&format!("augment argument {name}")), "{err}");
        }
        let err = AugmentConfig::from_keywords(serde_json::json!({"flip": 0.5})).unwrap_err();
        assert!(matches!(err, Error::Type(_)), "{err}");
    }

    #[test]
    fn streams_are_keyed_by_seed_epoch_and_index() {
        let draw = |s, e, i| Stream::new(s, e, i).next_u64();
        assert_eq!(draw(0, 0, 0), draw(0, 0, 0));
        let all = [
            draw(0, 0, 0),
            draw(1, 0, 0),
            draw(0, 1, 0),
            draw(0, 0, 1),
            draw(1, 1, 0),
        ];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j]);
            }
        }
    }

    #[test]
    fn crop_boxes_fit_and_cover_the_scale() {
        let mut rng = Stream::new(0, 0, 0);
        for _ in 0..500 {
            let [top, left, h, w] = crop_box(640, 480, [0.5, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(top + h <= 480 && left + w <= 640 && h > 0 && w > 0);
            let frac = (h * w) as f64 / (640.0 * 480.0);
            assert!((0.45..=1.0).contains(&frac), "{frac}");
        }
        // Nothing fits a 1x100 strip at these ratios: the central fallback.
        assert_eq!(
            crop_box(100, 1, [0.5, 1.0], [0.75, 4.0 / 3.0], &mut rng),
            [0, 49, 1, 1]
        );
    }

    #[test]
    fn flip_twice_is_the_image() {
        let img = image(7, 3);
        let f = flip(img.clone());
        assert_ne!(f, img);
        assert_eq!(&f.data[0..3], &img.data[6 * 4..6 * 4 + 3]);
        assert_eq!(flip(f), img);
    }

    #[test]
    fn magnitude_five_leaves_brightness_and_sharpness_alone() {
        let img = image(9, 8);
        let f = 0.5 * 1.8 + 0.1;
        assert_eq!(f, 1.0);
        assert_eq!(brightness(img.clone(), f as f32), img);
        assert_eq!(sharpness(img.clone(), f as f32), img);
    }

    #[test]
    fn integer_translation_shifts_and_fills() {
        let img = image(10, 6);
        let out = apply_op(img.clone(), &Op::TranslateX { offset: 3.0 }).unwrap();
        for y in 0..6 {
            for x in 0..10 {
                let o = (y * 10 + x) * 4;
                let expect = if x + 3 < 10 {
                    img.data[(y * 10 + x + 3) * 4..(y * 10 + x + 3) * 4 + 3].to_vec()
                } else {
                    vec![FILL; 3]
                };
                assert_eq!(out.data[o..o + 3], expect[..], "({x}, {y})");
            }
        }
    }

    #[test]
    fn plans_repeat_and_flip_only_when_allowed() {
        let cfg = AugmentConfig {
            flip_probability: 1.0,
            ..Default::default()
        };
        let p = |allowed| {
            plan(
                &cfg,
                500,
                375,
                (384, 384),
                Resample::Bicubic,
                allowed,
                &mut Stream::new(4, 1, 9),
            )
        };
        assert_eq!(p(true), p(true));
        assert!(p(true).contains(&Op::Flip));
        assert!(!p(false).contains(&Op::Flip));
        assert_eq!(
            p(true).iter().filter(|o| **o != Op::Flip).collect::<Vec<_>>(),
            p(false).iter().collect::<Vec<_>>()
        );
    }

    #[test]
    fn captions_naming_a_side() {
        for c in [
            "a dog on the left",
            "Right-hand side",
            "the leftmost car",
            "turning counterclockwise",
        ] {
            assert!(names_a_side(c), "{c}");
        }
        for c in ["a bright light", "copyright notice", "a cleft chin", "two dogs"] {
            assert!(!names_a_side(c), "{c}");
        }
    }
}
