//! The image processor's settings, defined once: transformers' `BlipImageProcessor` keys of a
//! `preprocessor_config.json` (or of the `image_processor` entry of a `processor_config.json`) with their
//! defaults, the checks made before any image is touched, call-time overrides
//! (`processor(images, size=224)`) and the settings written back. The bindings pass Python dicts through as
//! JSON; the Python face only converts images and paths.

use std::path::Path;
use std::sync::OnceLock;

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::image::DEFAULT_MAX_IMAGE_PIXELS;
use super::resize::Resample;
use crate::config::{settings_from_keywords, struct_fields};
use crate::error::{Error, Result};

/// transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`: BLIP's normalisation.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The older layout's file (what transformers' image processors write on their own).
pub const IMAGE_PROCESSOR_CONFIG: &str = "preprocessor_config.json";
/// The transformers 5 layout's file: the image settings under `image_processor`.
pub const PROCESSOR_CONFIG: &str = "processor_config.json";

/// Keys of a settings file that name the class rather than set anything: dropped when read, and
/// `image_processor_type` written back as ours.
const CLASS_KEYS: [&str; 2] = ["image_processor_type", "processor_class"];

/// The output size when resizing. Read from an int (a square), `{"height": h, "width": w}` or
/// `[h, w]`; written as `{"height": h, "width": w}`, as transformers writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

impl<'de> Deserialize<'de> for ImageSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        // A whole number (384 or 384.0), as Python's int() takes it.
        let dim = |v: &Value| {
            match v {
                Value::Number(n) => n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|x| x.fract() == 0.0 && *x >= 0.0 && *x < u64::MAX as f64)
                        .map(|x| x as u64)
                }),
                _ => None,
            }
            .and_then(|n| usize::try_from(n).ok())
        };
        let pair = |h: &Value, w: &Value| {
            Some(ImageSize {
                height: dim(h)?,
                width: dim(w)?,
            })
        };
        let size = match &value {
            Value::Number(_) => dim(&value).map(|n| ImageSize { height: n, width: n }),
            Value::Object(m) => match (m.get("height"), m.get("width")) {
                (Some(h), Some(w)) => pair(h, w),
                _ => None,
            },
            Value::Array(a) if a.len() == 2 => pair(&a[0], &a[1]),
            _ => None,
        };
        size.ok_or_else(|| {
            de::Error::custom(format!(
                "size must be a non-negative int or a dict with 'height' and 'width' for BLIP, got {value}"
            ))
        })
    }
}

/// `resample` as PIL numbers its filters (`PIL.Image.Resampling`).
mod pil_resample {
    use super::*;

    pub fn serialize<S: Serializer>(r: &Resample, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_i64(r.to_pil())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Resample, D::Error> {
        let value = Value::deserialize(d)?;
        value.as_i64().and_then(Resample::from_pil).ok_or_else(|| {
            de::Error::custom(format!(
                "unknown resample filter {value}: use 0 (nearest), 1 (lanczos), 2 (bilinear), 3 (bicubic), \
                 4 (box) or 5 (hamming)"
            ))
        })
    }
}

/// `image_mean` / `image_std`: one number for all channels or one per RGB channel; written as three.
mod per_channel {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[f64; 3], s: S) -> std::result::Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<[f64; 3], D::Error> {
        let value = Value::deserialize(d)?;
        let bad = || {
            de::Error::custom(format!(
                "expected a number or 3 numbers (one per RGB channel), got {value}"
            ))
        };
        match &value {
            Value::Number(n) => n.as_f64().map(|x| [x; 3]).ok_or_else(bad),
            Value::Array(items) if items.len() == 3 => {
                let mut out = [0.0; 3];
                for (o, item) in out.iter_mut().zip(items) {
                    *o = item.as_f64().ok_or_else(bad)?;
                }
                Ok(out)
            }
            _ => Err(bad()),
        }
    }
}

/// The image settings (transformers' `BlipImageProcessor` names and defaults, plus `max_image_pixels`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: ImageSize,
    #[serde(with = "pil_resample")]
    pub resample: Resample,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    #[serde(with = "per_channel")]
    pub image_mean: [f64; 3],
    #[serde(with = "per_channel")]
    pub image_std: [f64; 3],
    pub do_convert_rgb: bool,
    /// The most pixels an input image may have, encoded or decoded (`None`: no limit). Not a transformers
    /// setting, so it is not written to the settings file.
    pub max_image_pixels: Option<u64>,
    /// Keys of a settings file that are not ours (another processor's settings), written back as read.
    #[serde(skip)]
    pub extra: Map<String, Value>,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: ImageSize {
                height: 384,
                width: 384,
            },
            resample: Resample::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
            max_image_pixels: Some(DEFAULT_MAX_IMAGE_PIXELS),
            extra: Map::new(),
        }
    }
}

/// A value given as None means "not given" (the default, or the setting as it is), except for
/// `max_image_pixels`, where None means no limit.
fn given(key: &str, value: &Value) -> bool {
    !value.is_null() || key == "max_image_pixels"
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::config(format!(
            "{} does not hold a JSON object",
            path.display()
        ))),
        Err(e) => Err(Error::config(format!(
            "{} is not valid JSON: {e}",
            path.display()
        ))),
    }
}

impl ImageProcessorConfig {
    /// The names of the settings, in declaration order (the keywords `BlipImageProcessor` and its calls take).
    pub fn setting_names() -> &'static [&'static str] {
        struct_fields::<Self>()
    }

    /// Settings from a `preprocessor_config.json` object or the keywords of `BlipImageProcessor(...)`:
    /// absent or None settings take the defaults, keys that are not settings are kept (and written back by
    /// [`to_json`](Self::to_json)), and the result is checked. A value of the wrong type or out of range is an
    /// invalid argument naming the setting.
    pub fn from_json(settings: Value) -> Result<Self> {
        let Value::Object(map) = settings else {
            return Err(Error::invalid(format!(
                "image processor settings must be a dict (JSON object), got {settings}"
            )));
        };
        let names = Self::setting_names();
        let (mut known, mut extra) = (Map::new(), Map::new());
        for (key, value) in map {
            if names.contains(&key.as_str()) {
                if given(&key, &value) {
                    known.insert(key, value);
                }
            } else if !CLASS_KEYS.contains(&key.as_str()) {
                extra.insert(key, value);
            }
        }
        let mut config: Self = settings_from_keywords(Value::Object(known), "BlipImageProcessor")?;
        config.extra = extra;
        config.validate()?;
        Ok(config)
    }

    /// Reads a processor folder: `preprocessor_config.json` (the older layout) or the `image_processor` entry
    /// of `processor_config.json` (transformers 5), with `overrides` (keywords, as for
    /// [`from_json`](Self::from_json)) over the file's values.
    pub fn from_pretrained(folder: &Path, overrides: Value) -> Result<Self> {
        if !folder.is_dir() {
            return Err(Error::not_found("processor folder", folder));
        }
        let older = folder.join(IMAGE_PROCESSOR_CONFIG);
        let newer = folder.join(PROCESSOR_CONFIG);
        let mut map = if older.is_file() {
            read_json_object(&older)?
        } else {
            match newer.is_file().then(|| read_json_object(&newer)).transpose()? {
                Some(mut newer) => match newer.remove("image_processor") {
                    Some(Value::Object(map)) => map,
                    _ => return Err(Self::no_settings(folder)),
                },
                None => return Err(Self::no_settings(folder)),
            }
        };
        match overrides {
            Value::Object(overrides) => map.extend(overrides),
            Value::Null => {}
            other => return Err(Error::invalid(format!("overrides must be a dict, got {other}"))),
        }
        Self::from_json(Value::Object(map))
    }

    fn no_settings(folder: &Path) -> Error {
        Error::not_found(
            format!(
                "image processor settings ({IMAGE_PROCESSOR_CONFIG}, or an 'image_processor' entry in \
                 {PROCESSOR_CONFIG})"
            ),
            folder,
        )
    }

    /// These settings with a call's keywords applied (`processor(images, size=224, do_resize=True)`), checked.
    /// An unknown keyword is a type error, as for a Python function; a keyword given as None leaves its
    /// setting as it is (as transformers' `preprocess` does), except `max_image_pixels=None`: no limit.
    pub fn with_overrides(&self, keywords: Value) -> Result<Self> {
        let map = match keywords {
            Value::Object(map) => map,
            Value::Null => return Ok(self.clone()),
            other => return Err(Error::invalid(format!("overrides must be a dict, got {other}"))),
        };
        let call = "BlipImageProcessor.preprocess()";
        let names = Self::setting_names();
        if let Some(key) = map.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(Error::type_error(format!(
                "{call} got an unsupported keyword argument {key:?}"
            )));
        }
        if map.iter().all(|(k, v)| !given(k, v)) {
            return Ok(self.clone());
        }
        let Value::Object(mut merged) = self.settings() else {
            unreachable!("settings serialise to an object")
        };
        merged.extend(map.into_iter().filter(|(k, v)| given(k, v)));
        let mut config: Self = settings_from_keywords(Value::Object(merged), call)?;
        config.extra = self.extra.clone();
        config.validate()?;
        Ok(config)
    }

    /// Every setting by name (`max_image_pixels` included, the kept keys not).
    pub fn settings(&self) -> Value {
        serde_json::to_value(self).expect("the settings serialise to JSON")
    }

    /// The settings file's contents (`preprocessor_config.json`, or `processor_config.json`'s
    /// `image_processor`): the kept keys, transformers' settings and `image_processor_type`. transformers'
    /// `BlipImageProcessor` loads it.
    pub fn to_json(&self) -> Value {
        let mut out = self.extra.clone();
        if let Value::Object(settings) = self.settings() {
            out.extend(settings.into_iter().filter(|(k, _)| k != "max_image_pixels"));
        }
        out.insert("image_processor_type".into(), "BlipImageProcessor".into());
        Value::Object(out)
    }

    /// The checks made before any image is read; each error names the setting and its value.
    pub fn validate(&self) -> Result<()> {
        if self.do_resize && (self.size.height == 0 || self.size.width == 0) {
            return Err(Error::invalid(format!(
                "size must be positive, got height={} width={}",
                self.size.height, self.size.width
            )));
        }
        if !self.rescale_factor.is_finite() {
            return Err(Error::invalid(format!(
                "rescale_factor must be a finite number, got {}",
                self.rescale_factor
            )));
        }
        for (name, values) in [("image_mean", &self.image_mean), ("image_std", &self.image_std)] {
            if values.iter().any(|v| !v.is_finite()) {
                return Err(Error::invalid(format!(
                    "{name} must be finite numbers, got {values:?}"
                )));
            }
        }
        if self.do_normalize && self.image_std.contains(&0.0) {
            return Err(Error::invalid("image_std must not contain 0"));
        }
        if self.max_image_pixels == Some(0) {
            return Err(Error::invalid(
                "max_image_pixels=0 would refuse every image; use None for no limit, or a positive number of pixels",
            ));
        }
        self.check_output(1)
    }

    /// Refuses a resized output of `images` images that could not be allocated, before anything is: more
    /// bytes than this machine's memory (or its cgroup's limit).
    pub fn check_output(&self, images: usize) -> Result<()> {
        if !self.do_resize {
            return Ok(());
        }
        let ImageSize { height, width } = self.size;
        // 3 float32 channels; saturating: a count past u128 is past any memory too.
        let per_image =
            (height as u128 * width as u128).saturating_mul(3 * std::mem::size_of::<f32>() as u128);
        let bytes = per_image.saturating_mul(images as u128);
        let memory = memory_bytes().min(isize::MAX as u128);
        if bytes > memory {
            return Err(Error::invalid(format!(
                "size={height}x{width}: pixel_values for {images} image(s) would need {bytes} bytes \
                 (3 x {height} x {width} float32 each), more than this machine's {memory} bytes of memory; \
                 use a smaller size or fewer images at a time"
            )));
        }
        Ok(())
    }

    /// uint8 value -> output float for each channel. transformers' numpy path computes
    /// `float32(float64(v) * rescale_factor)`, then `(x - float32(mean)) / float32(std)` in float32; a
    /// table built with exactly those operations gives exactly its numbers.
    pub(super) fn lookup(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let mut x = if self.do_rescale {
                    (v as f64 * self.rescale_factor) as f32
                } else {
                    v as f32
                };
                if self.do_normalize {
                    x = (x - self.image_mean[c] as f32) / self.image_std[c] as f32;
                }
                *out = x;
            }
        }
        lut
    }

    /// [`Self::lookup`] for the 8-bit pixels of a float image scaled from `[0, 1]` to be resized:
    /// transformers first divides them by 255 again (`float32(float64(v) / 255)`), then rescales and
    /// normalises as usual.
    pub(super) fn lookup_unit_range(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let mut x = (v as f64 * (1.0 / 255.0)) as f32;
                if self.do_rescale {
                    x = (x as f64 * self.rescale_factor) as f32;
                }
                if self.do_normalize {
                    x = (x - self.image_mean[c] as f32) / self.image_std[c] as f32;
                }
                *out = x;
            }
        }
        lut
    }

    /// Float pixels (`[plane, 3]`, channels last) kept at their size, rescaled and normalised as transformers'
    /// numpy path does (`float32(float64(x) * rescale_factor)`; unrescaled pixels are normalised in their own
    /// precision: float64 when `double`), channels first.
    pub(super) fn float_chw(&self, data: &[f64], plane: usize, double: bool) -> Vec<f32> {
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let x = px[c];
                out[c * plane + i] = if self.do_rescale || !double {
                    let mut y = if self.do_rescale {
                        (x * self.rescale_factor) as f32
                    } else {
                        x as f32
                    };
                    if self.do_normalize {
                        y = (y - self.image_mean[c] as f32) / self.image_std[c] as f32;
                    }
                    y
                } else if self.do_normalize {
                    ((x - self.image_mean[c]) / self.image_std[c]) as f32
                } else {
                    x as f32
                };
            }
        }
        out
    }
}

/// The memory this process may use, in bytes: the machine's physical memory, or its cgroup's limit when
/// that is lower. Unknown: no bound.
pub fn memory_bytes() -> u128 {
    static MEMORY: OnceLock<u128> = OnceLock::new();
    *MEMORY.get_or_init(|| {
        let mut memory = u128::MAX;
        #[cfg(unix)]
        {
            // SAFETY: sysconf only reads system constants.
            let (pages, page) = unsafe {
                (
                    libc::sysconf(libc::_SC_PHYS_PAGES),
                    libc::sysconf(libc::_SC_PAGESIZE),
                )
            };
            if pages > 0 && page > 0 {
                memory = pages as u128 * page as u128;
            }
        }
        for file in [
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        ] {
            if let Some(limit) = std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse::<u128>().ok())
            {
                memory = memory.min(limit);
            }
        }
        memory
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn err(settings: Value) -> Error {
        ImageProcessorConfig::from_json(settings).unwrap_err()
    }

    #[test]
    fn defaults_are_transformers_blip_defaults() {
        let c = ImageProcessorConfig::from_json(json!({})).unwrap();
        assert_eq!(c, ImageProcessorConfig::default());
        assert_eq!(
            ImageProcessorConfig::setting_names(),
            [
                "do_resize",
                "size",
                "resample",
                "do_rescale",
                "rescale_factor",
                "do_normalize",
                "image_mean",
                "image_std",
                "do_convert_rgb",
                "max_image_pixels"
            ]
        );
        // None is "not given": the default, except max_image_pixels (no limit).
        let c = ImageProcessorConfig::from_json(
            json!({"size": null, "image_mean": null, "max_image_pixels": null}),
        )
        .unwrap();
        assert_eq!(
            (c.size.height, c.image_mean, c.max_image_pixels),
            (384, OPENAI_CLIP_MEAN, None)
        );
    }

    #[test]
    fn settings_file_round_trip_keeps_other_keys() {
        let file = json!({
            "do_normalize": true, "do_resize": true, "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "BlipImageProcessorFast", "processor_class": "BlipProcessor",
            "image_std": 0.5, "resample": 2, "rescale_factor": 0.00392156862745098,
            "size": {"height": 224, "width": 160}, "crop_size": {"height": 3}
        });
        let c = ImageProcessorConfig::from_json(file).unwrap();
        assert_eq!(
            (c.size.height, c.size.width, c.resample),
            (224, 160, Resample::Bilinear)
        );
        assert_eq!(c.image_std, [0.5; 3]);
        let out = c.to_json();
        assert_eq!(out["crop_size"], json!({"height": 3}));
        assert_eq!(out["image_processor_type"], "BlipImageProcessor");
        assert_eq!(out["size"], json!({"height": 224, "width": 160}));
        assert_eq!(out["image_std"], json!([0.5, 0.5, 0.5]));
        assert!(out.get("processor_class").is_none() && out.get("max_image_pixels").is_none());
        assert_eq!(ImageProcessorConfig::from_json(out).unwrap(), c);
        for size in [
            json!(300),
            json!([300, 300]),
            json!({"height": 300, "width": 300.0}),
        ] {
            let c = ImageProcessorConfig::from_json(json!({ "size": size })).unwrap();
            assert_eq!(
                c.size,
                ImageSize {
                    height: 300,
                    width: 300
                }
            );
        }
    }

    #[test]
    fn overrides_merge_and_none_keeps_the_setting() {
        let base =
            ImageProcessorConfig::from_json(json!({"size": 224, "max_image_pixels": 1000000})).unwrap();
        let c = base
            .with_overrides(json!({"do_resize": false, "size": null}))
            .unwrap();
        assert_eq!(
            (c.do_resize, c.size.height, c.max_image_pixels),
            (false, 224, Some(1000000))
        );
        let c = base
            .with_overrides(json!({"max_image_pixels": null, "resample": 0}))
            .unwrap();
        assert_eq!((c.max_image_pixels, c.resample), (None, Resample::Nearest));
        assert_eq!(base.with_overrides(json!({})).unwrap(), base);
        let e = base.with_overrides(json!({"sizes": 3})).unwrap_err();
        assert!(
            matches!(e, Error::Type(ref m) if m.contains("unsupported keyword argument \"sizes\"")),
            "{e}"
        );
        let e = base.with_overrides(json!({"do_resize": "yes"})).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(ref m) if m.contains("do_resize")),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            (json!({"size": {"shortest_edge": 3}}), "size must be"),
            (json!({"size": -4}), "size must be"),
            (json!({"size": 0}), "size must be positive"),
            (json!({"resample": 9}), "unknown resample filter 9"),
            (
                json!({"image_mean": [0.5, 0.5]}),
                "argument image_mean: expected a number or 3 numbers",
            ),
            (
                json!({"image_std": [0.5, 0.0, 0.5]}),
                "image_std must not contain 0",
            ),
            (
                json!({"max_image_pixels": 0}),
                "max_image_pixels=0 would refuse every image; use None",
            ),
            (json!({"max_image_pixels": -1}), "argument max_image_pixels"),
            (json!({"rescale_factor": "x"}), "argument rescale_factor"),
        ];
        for (settings, message) in cases {
            let e = err(settings.clone());
            assert!(
                matches!(e, Error::InvalidArgument(ref m) if m.contains(message)),
                "{settings}: {e}"
            );
        }
        let e = ImageProcessorConfig::from_json(json!([1])).unwrap_err();
        assert!(e.to_string().contains("must be a dict"), "{e}");
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        for (name, c) in [
            (
                "rescale_factor",
                ImageProcessorConfig {
                    rescale_factor: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "image_mean",
                ImageProcessorConfig {
                    image_mean: [0.5, f64::INFINITY, 0.5],
                    ..Default::default()
                },
            ),
            (
                "image_std",
                ImageProcessorConfig {
                    image_std: [f64::NAN; 3],
                    ..Default::default()
                },
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(name) && e.contains("finite"), "{e}");
        }
    }

    #[test]
    fn outputs_too_large_to_allocate_are_refused_first() {
        let e = err(json!({"size": 1_000_000})).to_string();
        assert!(
            e.contains("size=1000000x1000000") && e.contains("12000000000000 bytes"),
            "{e}"
        );
        assert!(e.contains("bytes of memory"), "{e}");
        // Sizes whose byte count overflows 64 bits are still counted.
        let e = err(json!({"size": u64::MAX})).to_string();
        assert!(e.contains("bytes of memory"), "{e}");
        // 46341 x 46341 (past 2^31 pixels): refused where 25.8 GB does not fit.
        let bytes = 3 * 46341u128 * 46341 * 4;
        match ImageProcessorConfig::from_json(json!({"size": 46341})) {
            Err(e) => assert!(
                bytes > memory_bytes() && e.to_string().contains("25769859372 bytes"),
                "{e}"
            ),
            Ok(_) => assert!(bytes <= memory_bytes()),
        }
        // A batch is counted whole.
        let c = ImageProcessorConfig {
            size: ImageSize {
                height: 10_000,
                width: 10_000,
            },
            ..Default::default()
        };
        c.check_output(1).unwrap();
        let e = c.check_output(1 << 40).unwrap_err().to_string();
        assert!(e.contains("for 1099511627776 image(s)"), "{e}");
        // Without resizing the size is not used.
        ImageProcessorConfig::from_json(json!({"size": 1_000_000, "do_resize": false})).unwrap();
    }

    #[test]
    fn folders_in_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let e = ImageProcessorConfig::from_pretrained(dir.path(), Value::Null).unwrap_err();
        assert!(
            matches!(e, Error::NotFound { .. }) && e.to_string().contains("preprocessor_config.json"),
            "{e}"
        );
        std::fs::write(
            dir.path().join(PROCESSOR_CONFIG),
            r#"{"image_processor": {"size": {"height": 32, "width": 32}}, "processor_class": "BlipProcessor"}"#,
        )
        .unwrap();
        let c = ImageProcessorConfig::from_pretrained(dir.path(), json!({"resample": 0})).unwrap();
        assert_eq!((c.size.height, c.resample), (32, Resample::Nearest));
        std::fs::write(dir.path().join(IMAGE_PROCESSOR_CONFIG), r#"{"size": 64}"#).unwrap();
        let c = ImageProcessorConfig::from_pretrained(dir.path(), Value::Null).unwrap();
        assert_eq!(c.size.height, 64);
        std::fs::write(dir.path().join(IMAGE_PROCESSOR_CONFIG), "{nope").unwrap();
        let e = ImageProcessorConfig::from_pretrained(dir.path(), Value::Null).unwrap_err();
        assert!(e.to_string().contains("is not valid JSON"), "{e}");
        let e = ImageProcessorConfig::from_pretrained(&dir.path().join("missing"), Value::Null).unwrap_err();
        assert!(e.to_string().starts_with("processor folder not found"), "{e}");
    }
}
