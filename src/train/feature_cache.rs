//! The frozen vision tower's feature cache: when nothing in the vision tower trains and nothing in it is
//! random (no trained parameter, no dropout, no augmentation), an image's embeddings are the same in every
//! epoch, so each example's are computed once and reused by later epochs.
//!
//! What is cached is exactly what the uncached step computes: the tower's output for the example under the
//! training context, in the kind it is produced in (float32, or bf16/fp16 under mixed precision), copied to
//! host memory. Entries are keyed by the dataset's example index and held until the run ends, within a budget
//! of host memory (`train(feature_cache=...)`, [`DEFAULT_BUDGET_MB`] by default); past it, the remaining
//! examples are recomputed every epoch. The batch source skips decoding the images of cached rows. Cached or
//! not, a frozen tower's features are computed one image at a time ([`frozen_images`]), so an image's do not
//! depend on its batch mates on any CPU.
//!
//! For the captioner it also keeps each image's cross-attention projections ([`CrossProjections`]: every
//! decoder layer's `key` and `value` base outputs over the image positions, 25 times the embeddings' bytes at
//! blip-image-captioning-base's shapes), when those base weights are frozen, the step runs without gradient
//! checkpointing, and every example's embeddings and projections fit in the budget together (decided at the
//! first image; else only the embeddings are kept, 2 GiB holding ~48 images with projections in float32,
//! ~1,200 without). Those GEMMs are most of a text-only step's work; the adapters on `key`/`value` still add
//! their part every step, from the cached embeddings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Deserializer};
use tch::{Device, Tensor};

use super::task::TrainTask;
use crate::blip::text::CrossProjections;
use crate::data::BatchSource;
use crate::error::{Error, Result};
use crate::nn::ForwardContext;

/// The default budget: 2 GiB of host memory, about 1,200 images at blip-image-captioning-base's shapes in
/// float32 (577 × 768 values, 1.77 MB an image), 2,400 in bf16.
pub const DEFAULT_BUDGET_MB: u64 = 2048;

/// `train(feature_cache=...)`: True (the default budget), False (off), or a budget in MiB (2^20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureCacheSetting {
    Off,
    Budget { bytes: u64 },
}

impl Default for FeatureCacheSetting {
    fn default() -> Self {
        Self::Budget {
            bytes: DEFAULT_BUDGET_MB << 20,
        }
    }
}

impl<'de> Deserialize<'de> for FeatureCacheSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let bad = |v: &serde_json::Value| {
            D::Error::custom(format!(
                "feature_cache must be True, False or a budget in MiB (a non-negative number), got {v}"
            ))
        };
        Ok(match serde_json::Value::deserialize(d)? {
            serde_json::Value::Bool(true) | serde_json::Value::Null => Self::default(),
            serde_json::Value::Bool(false) => Self::Off,
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(0.0) => Self::Off,
                Some(mb) if mb > 0.0 && mb.is_finite() => Self::Budget {
                    bytes: (mb * (1u64 << 20) as f64) as u64,
                },
                _ => return Err(bad(&serde_json::Value::Number(n))),
            },
            other => return Err(bad(&other)),
        })
    }
}

/// What the cache did in a run (`TrainOutcome::feature_cache`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeatureCacheReport {
    /// Whether the run used the cache.
    pub enabled: bool,
    /// Why it did not (turned off, or a condition that does not hold).
    pub reason: Option<String>,
    pub budget_bytes: u64,
    /// Rows whose embeddings came from the cache.
    pub hits: u64,
    /// Rows whose embeddings the vision tower computed (stored when they fit in the budget).
    pub misses: u64,
    /// Examples held at the end, and their bytes.
    pub cached_examples: usize,
    pub cached_bytes: u64,
    /// Whether the decoder's cross-attention projections were kept with the embeddings.
    pub cross_projections: bool,
}

/// Why an example's image features may differ between epochs, or None when they cannot: the vision tower
/// trains or draws random numbers, or the source's pixels are not the same for an example in every epoch.
/// When None the cache may serve the run (unless turned off) and the step computes the features image by
/// image ([`frozen_images`]), cached or not.
pub fn frozen_refusal<T: TrainTask + ?Sized>(
    model: &mut T,
    source: &dyn BatchSource,
) -> Result<Option<String>> {
    if model.vision_model().has_trainable() {
        return Ok(Some(
            "the vision tower has trainable parameters (LoRA target_modules or modules_to_save in vision_model): \
             its embeddings change every step"
                .into(),
        ));
    }
    let p = model.vision_model().attention_dropout();
    if p > 0.0 {
        return Ok(Some(format!(
            "vision_config.attention_dropout is {p}: the vision tower draws dropout masks in training"
        )));
    }
    if let Some((path, p)) =
        crate::lora::inject::first_adapter_dropout(model.vision_model_mut(), "vision_model")?
    {
        return Ok(Some(format!(
            "the adapter on {path} has lora_dropout {p}: the vision tower draws dropout masks in training"
        )));
    }
    Ok(source.feature_cache_refusal())
}

/// One image's features, on the host in the cache: its embeddings `[N, C]`, and each decoder layer's
/// cross-attention key/value base projections of them `[N, C']` when computed or kept.
struct ImageFeatures {
    embeddings: Tensor,
    projections: Option<Vec<(Tensor, Tensor)>>,
}

impl ImageFeatures {
    /// The same tensors (no copy).
    fn shallow_clone(&self) -> Self {
        Self {
            embeddings: self.embeddings.shallow_clone(),
            projections: self.projections.as_ref().map(|p| {
                p.iter()
                    .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
                    .collect()
            }),
        }
    }

    fn bytes(&self) -> u64 {
        bytes_of(&self.embeddings)
            + self
                .projections
                .as_ref()
                .map_or(0, |p| p.iter().map(|(k, v)| bytes_of(k) + bytes_of(v)).sum())
    }
}

/// Whether the cross-attention projections are kept: not decided before the first computed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Projections {
    Undecided,
    Kept,
    Off,
}

/// A micro-batch's image embeddings `[B, N, C]`, with their cross-attention projections when the step reads
/// them.
pub struct CachedImages {
    pub embeddings: Tensor,
    pub projected: Option<CrossProjections>,
}

/// The frozen vision tower's output for checked pixels `[1, 3, H, W]` (one image), without a graph, and with
/// `projections` its cross-attention projections. One image at a time, so that an image's features do not
/// depend on its batch mates: some CPUs' GEMM kernels (MKL's AVX2 path on Intel, at small row counts) round a
/// row differently in a call over more rows, and cached features must be what the uncached step computes.
fn image_features<T: TrainTask + ?Sized>(
    model: &T,
    pixels: &Tensor,
    projections: bool,
    cx: &ForwardContext,
) -> Result<ImageFeatures> {
    let _guard = tch::no_grad_guard();
    let image = model.encode_images(pixels, cx)?;
    Ok(ImageFeatures {
        projections: match projections {
            true => row_projections(model, &image, cx)?,
            false => None,
        },
        embeddings: image.f_squeeze_dim(0)?,
    })
}

/// The cross-attention projections of one image's embeddings `[1, N, C]`, as rows `[N, C']`.
fn row_projections<T: TrainTask + ?Sized>(
    model: &T,
    image: &Tensor,
    cx: &ForwardContext,
) -> Result<Option<Vec<(Tensor, Tensor)>>> {
    let _guard = tch::no_grad_guard();
    Ok(model.cross_projections(image, cx)?.map(|p| p.layers))
}

/// The image features of an uncached micro-batch whose vision tower is frozen ([`frozen_refusal`] is None),
/// computed image by image as the cache computes them; with `projections`, the cross-attention projections
/// too (when the head has frozen ones).
pub fn frozen_images<T: TrainTask + ?Sized>(
    model: &T,
    pixel_values: &Tensor,
    projections: bool,
    cx: &ForwardContext,
) -> Result<CachedImages> {
    let pixels = model.check_pixel_values(pixel_values, cx)?;
    let rows = (0..pixels.size()[0])
        .map(|i| image_features(model, &pixels.f_narrow(0, i, 1)?, projections, cx))
        .collect::<Result<Vec<_>>>()?;
    if rows.is_empty() {
        model.vision_model().seed_as_after_forward(cx);
    }
    assemble(rows, model.device())
}

/// The rows' features stacked into the batch's, on `device`: the projections when every row has them.
fn assemble(rows: Vec<ImageFeatures>, device: Device) -> Result<CachedImages> {
    let embeddings: Vec<Tensor> = rows
        .iter()
        .map(|r| r.embeddings.f_to_device(device))
        .collect::<std::result::Result<_, _>>()?;
    let embeddings = Tensor::f_stack(&embeddings, 0)?;
    let projections = rows
        .iter()
        .map(|r| r.projections.as_ref())
        .collect::<Option<Vec<_>>>();
    let projected = match projections {
        Some(rows) if !rows.is_empty() => {
            let layers = (0..rows[0].len())
                .map(|l| {
                    let stack = |pick: &dyn Fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Tensor> {
                        let parts = rows
                            .iter()
                            .map(|r| pick(&r[l]).f_to_device(device))
                            .collect::<std::result::Result<Vec<_>, _>>()?;
                        Ok(Tensor::f_cat(&parts, 0)?) // the batch's rows, `[B·N, C']`
                    };
                    Ok((stack(&|kv| &kv.0)?, stack(&|kv| &kv.1)?))
                })
                .collect::<Result<Vec<_>>>()?;
            // Fresh tensors, read by this step's forward alone: its adapters may add into them.
            Some(CrossProjections {
                layers,
                writable: true,
            })
        }
        _ => None,
    };
    Ok(CachedImages {
        embeddings,
        projected,
    })
}

/// The features held, by example index.
pub struct FeatureCache {
    entries: Vec<Option<ImageFeatures>>,
    /// Which examples are held, shared with the batch source's thread (which then skips their pixels).
    /// An entry is never dropped during a run, so a row the thread saw held is still held when it is used.
    held: Arc<Vec<AtomicBool>>,
    budget: u64,
    used: u64,
    hits: u64,
    misses: u64,
    /// Whether the step reads the cross-attention projections (no gradient checkpointing).
    read_projections: bool,
    keep_projections: Projections,
}

impl FeatureCache {
    /// A cache for `examples` examples within `budget` bytes; `read_projections`: whether the step reads the
    /// cross-attention projections (then computed for every row, and kept when all examples fit with them).
    pub fn new(examples: usize, budget: u64, read_projections: bool) -> Self {
        Self {
            entries: (0..examples).map(|_| None).collect(),
            held: Arc::new((0..examples).map(|_| AtomicBool::new(false)).collect()),
            budget,
            used: 0,
            hits: 0,
            misses: 0,
            read_projections,
            keep_projections: match read_projections {
                true => Projections::Undecided,
                false => Projections::Off,
            },
        }
    }

    /// The flags the batch source's thread reads.
    pub fn held(&self) -> Arc<Vec<AtomicBool>> {
        self.held.clone()
    }

    /// The image features of a training micro-batch (`indices`, in order) on `device`. `pixel_values` holds
    /// the rows `with_pixels` marks (in order); those whose example is not held yet are computed (image by
    /// image, as [`frozen_images`]) and stored while the budget lasts, every other row comes from the cache
    /// (a row the batch thread prepared before its example was stored is served from the cache too), its
    /// projections computed from its embeddings when they are read but not kept. No graph is kept (the tower
    /// holds no trained weight), and torch's RNG is left as the uncached step leaves it.
    pub fn images<T: TrainTask + ?Sized>(
        &mut self,
        model: &T,
        indices: &[usize],
        with_pixels: &[bool],
        pixel_values: &Tensor,
        cx: &ForwardContext,
    ) -> Result<CachedImages> {
        let pixels = match with_pixels.iter().any(|&p| p) {
            true => Some(model.check_pixel_values(pixel_values, cx)?),
            false => None,
        };
        let mut rows = Vec::with_capacity(indices.len());
        let mut position = 0i64; // the next row of `pixel_values`
        let mut computed_any = false;
        for (&example, &has_pixels) in indices.iter().zip(with_pixels) {
            let held = self
                .entries
                .get(example)
                .and_then(Option::as_ref)
                .map(ImageFeatures::shallow_clone);
            let row = match (held, &pixels) {
                (Some(mut held), _) => {
                    self.hits += 1;
                    if held.projections.is_none() && self.read_projections {
                        held.projections = row_projections(model, &held.embeddings.f_unsqueeze(0)?, cx)?;
                    }
                    held
                }
                (None, Some(pixels)) if has_pixels => {
                    self.misses += 1;
                    computed_any = true;
                    let row = image_features(
                        model,
                        &pixels.f_narrow(0, position, 1)?,
                        self.read_projections,
                        cx,
                    )?;
                    self.decide(&row);
                    self.store(example, &row)?;
                    row
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "feature cache: example {example} has neither pixels nor cached features"
                    )))
                }
            };
            position += i64::from(has_pixels);
            rows.push(row);
        }
        if !computed_any {
            model.vision_model().seed_as_after_forward(cx);
        }
        assemble(rows, model.device())
    }

    /// At the first computed image: whether the projections are kept, when the head has them and every
    /// example's embeddings and projections fit in the budget.
    fn decide(&mut self, first: &ImageFeatures) {
        if self.keep_projections != Projections::Undecided {
            return;
        }
        let fits = first.projections.is_some()
            && (self.entries.len() as u64).saturating_mul(first.bytes()) <= self.budget;
        self.keep_projections = match fits {
            true => Projections::Kept,
            false => Projections::Off,
        };
    }

    /// Keeps a host copy of `row` (one example's embeddings, with its projections when they are kept) when
    /// it fits in the budget.
    fn store(&mut self, example: usize, row: &ImageFeatures) -> Result<()> {
        if self.entries.get(example).is_none_or(Option::is_some) {
            return Ok(());
        }
        let host =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_device(Device::Cpu)?.f_detach_copy()?) };
        let copy = ImageFeatures {
            embeddings: host(&row.embeddings)?,
            projections: match (&row.projections, self.keep_projections) {
                (Some(p), Projections::Kept) => Some(
                    p.iter()
                        .map(|(k, v)| Ok((host(k)?, host(v)?)))
                        .collect::<Result<Vec<_>>>()?,
                ),
                _ => None,
            },
        };
        let bytes = copy.bytes();
        if self.used + bytes > self.budget {
            return Ok(());
        }
        self.entries[example] = Some(copy);
        self.used += bytes;
        self.held[example].store(true, Ordering::Release);
        Ok(())
    }

    pub fn report(&self) -> FeatureCacheReport {
        FeatureCacheReport {
            enabled: true,
            reason: None,
            budget_bytes: self.budget,
            hits: self.hits,
            misses: self.misses,
            cached_examples: self.entries.iter().filter(|e| e.is_some()).count(),
            cached_bytes: self.used,
            cross_projections: self.keep_projections == Projections::Kept,
        }
    }
}

fn bytes_of(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Which rows of a micro-batch need their pixels: those whose example the cache does not hold yet.
pub fn rows_needing_pixels(held: &[AtomicBool], indices: &[usize]) -> Vec<bool> {
    indices
        .iter()
        .map(|&i| !held.get(i).is_some_and(|h| h.load(Ordering::Acquire)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_true_false_and_budgets() {
        let read = |v| serde_json::from_value::<FeatureCacheSetting>(v);
        assert_eq!(
            read(serde_json::json!(true)).unwrap(),
            FeatureCacheSetting::default()
        );
        assert_eq!(read(serde_json::json!(false)).unwrap(), FeatureCacheSetting::Off);
        assert_eq!(read(serde_json::json!(0)).unwrap(), FeatureCacheSetting::Off);
        assert_eq!(
            read(serde_json::json!(1.5)).unwrap(),
            FeatureCacheSetting::Budget { bytes: 3 << 19 }
        );
        assert!(read(serde_json::json!(-1))
            .unwrap_err()
            .to_string()
            .contains("feature_cache must be"));
        assert!(read(serde_json::json!("big")).is_err());
    }
}
