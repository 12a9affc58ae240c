//! The frozen vision tower's feature cache: when nothing in the vision tower trains and nothing in it is
//! random (no trained parameter, no dropout, no augmentation), an image's embeddings are the same in every
//! epoch, so each example's are computed once and reused by later epochs.
//!
//! What is cached is exactly what the uncached step computes: the tower's output for the example under the
//! training context, in the kind it is produced in (float32, or bf16/fp16 under mixed precision), copied to
//! host memory. Entries are keyed by the dataset's example index and held until the run ends, within a budget
//! of host memory (`train(feature_cache=...)`, [`DEFAULT_BUDGET_MB`] by default); past it, the remaining
//! examples are recomputed every epoch. The batch source skips decoding the images of cached rows.
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

/// Why the cache cannot serve this run, or None when it can: the vision tower trains or draws random numbers,
/// or the source's pixels are not the same for an example in every epoch.
pub fn refusal<T: TrainTask + ?Sized>(
    model: &mut T,
    source: &dyn BatchSource,
    setting: FeatureCacheSetting,
) -> Result<Option<String>> {
    if setting == FeatureCacheSetting::Off {
        return Ok(Some("turned off (feature_cache=False)".into()));
    }
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

/// One example's cached tensors, on the host: the image embeddings `[N, C]`, and with them each decoder
/// layer's cross-attention key/value base projections `[N, C']` when the cache keeps those.
struct Entry {
    embeddings: Tensor,
    projections: Option<Vec<(Tensor, Tensor)>>,
}

/// Whether the cross-attention projections are kept: not decided before the first computed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Projections {
    Undecided,
    Kept,
    Off,
}

/// A micro-batch's image embeddings `[B, N, C]`, with their cross-attention projections when the cache keeps
/// them.
pub struct CachedImages {
    pub embeddings: Tensor,
    pub projected: Option<CrossProjections>,
}

/// The embeddings held, by example index.
pub struct FeatureCache {
    entries: Vec<Option<Entry>>,
    /// Which examples are held, shared with the batch source's thread (which then skips their pixels).
    /// An entry is never dropped during a run, so a row the thread saw held is still held when it is used.
    held: Arc<Vec<AtomicBool>>,
    budget: u64,
    used: u64,
    hits: u64,
    misses: u64,
    projections: Projections,
}

impl FeatureCache {
    /// A cache for `examples` examples within `budget` bytes; `projections`: whether it may keep the
    /// cross-attention projections too (the step reads them: no gradient checkpointing).
    pub fn new(examples: usize, budget: u64, projections: bool) -> Self {
        Self {
            entries: (0..examples).map(|_| None).collect(),
            held: Arc::new((0..examples).map(|_| AtomicBool::new(false)).collect()),
            budget,
            used: 0,
            hits: 0,
            misses: 0,
            projections: match projections {
                true => Projections::Undecided,
                false => Projections::Off,
            },
        }
    }

    /// The flags the batch source's thread reads.
    pub fn held(&self) -> Arc<Vec<AtomicBool>> {
        self.held.clone()
    }

    /// The image embeddings of a training micro-batch (`indices`, in order) on `device`, with their
    /// cross-attention projections when kept. `pixel_values` holds the rows `with_pixels` marks (in order);
    /// those whose example is not held yet are computed and stored while the budget lasts, every other row
    /// comes from the cache (a row the batch thread prepared before its example was stored is served from the
    /// cache too). Computed as the uncached step computes them (the tower holds no trained weight, so no
    /// graph is kept), and torch's RNG is left as that step leaves it.
    pub fn images<T: TrainTask + ?Sized>(
        &mut self,
        model: &T,
        indices: &[usize],
        with_pixels: &[bool],
        pixel_values: &Tensor,
        cx: &ForwardContext,
    ) -> Result<CachedImages> {
        let device = model.device();
        let held = |e: usize| self.entries.get(e).is_some_and(Option::is_some);
        // Per row: computed here (its position among the computed rows), or from the cache.
        let mut compute = Vec::with_capacity(indices.len());
        let mut pixel_rows = Vec::new(); // the computed rows' positions in `pixel_values`
        let mut position = 0i64;
        for (&example, &has_pixels) in indices.iter().zip(with_pixels) {
            let computed_here = has_pixels && !held(example);
            if computed_here {
                pixel_rows.push(position);
            }
            compute.push(computed_here);
            position += i64::from(has_pixels);
        }
        let computed = if pixel_rows.is_empty() {
            model.vision_model().seed_as_after_forward(cx);
            None
        } else {
            let pixels = if pixel_rows.len() as i64 == position {
                pixel_values.shallow_clone()
            } else {
                pixel_values.f_index_select(0, &Tensor::f_from_slice(&pixel_rows)?)?
            };
            let pv = model.check_pixel_values(&pixels, cx)?;
            let _guard = tch::no_grad_guard();
            Some(model.encode_images(&pv, cx)?)
        };
        let computed_projections = match (&computed, self.projections) {
            (Some(images), Projections::Undecided | Projections::Kept) => {
                self.projections_of(model, images, cx)?
            }
            _ => None,
        };
        let mut rows = Vec::with_capacity(indices.len());
        let mut row_projections = Vec::with_capacity(indices.len());
        let mut next = 0i64;
        for (&example, &computed_here) in indices.iter().zip(&compute) {
            if computed_here {
                let row = computed
                    .as_ref()
                    .ok_or_else(|| Error::invalid("feature cache: a row's embeddings are missing"))?
                    .f_get(next)?;
                let projections = match &computed_projections {
                    Some(p) => Some(
                        p.layers
                            .iter()
                            .map(|(k, v)| Ok((k.f_get(next)?, v.f_get(next)?)))
                            .collect::<Result<Vec<_>>>()?,
                    ),
                    None => None,
                };
                next += 1;
                self.misses += 1;
                self.store(example, &row, projections.as_deref())?;
                rows.push(row);
                row_projections.push(projections);
            } else {
                let held = self
                    .entries
                    .get(example)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "feature cache: example {example} was marked held but is not"
                        ))
                    })?;
                self.hits += 1;
                rows.push(held.embeddings.f_to_device(device)?);
                row_projections.push(match &held.projections {
                    Some(p) => Some(
                        p.iter()
                            .map(|(k, v)| Ok((k.f_to_device(device)?, v.f_to_device(device)?)))
                            .collect::<Result<Vec<_>>>()?,
                    ),
                    None => None,
                });
            }
        }
        let all_computed_here = next == indices.len() as i64;
        let projected = match (self.projections, computed_projections) {
            (Projections::Kept, Some(p)) if all_computed_here => Some(p),
            (Projections::Kept, _) => Some(stack_projections(row_projections)?),
            _ => None,
        };
        let embeddings = match computed {
            // Every row computed here: the tower's own output, untouched.
            Some(all) if all_computed_here => all,
            _ => Tensor::f_stack(&rows, 0)?,
        };
        Ok(CachedImages {
            embeddings,
            projected,
        })
    }

    /// The cross-attention projections of freshly computed `images`; at the first images, decides whether
    /// they are kept: when the head has them (frozen) and every example's embeddings and projections fit in
    /// the budget.
    fn projections_of<T: TrainTask + ?Sized>(
        &mut self,
        model: &T,
        images: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Option<CrossProjections>> {
        let projected = model.cross_projections(images, cx)?;
        if self.projections == Projections::Undecided {
            let fits = projected.as_ref().is_some_and(|p| {
                let rows = images.size()[0].max(1) as u64;
                let per_example = (bytes_of(images)
                    + p.layers
                        .iter()
                        .map(|(k, v)| bytes_of(k) + bytes_of(v))
                        .sum::<u64>())
                    / rows;
                (self.entries.len() as u64).saturating_mul(per_example) <= self.budget
            });
            self.projections = match fits {
                true => Projections::Kept,
                false => Projections::Off,
            };
        }
        Ok(projected.filter(|_| self.projections == Projections::Kept))
    }

    /// Keeps a host copy of `row` (one example's embeddings, with its projections when kept) when it fits in
    /// the budget.
    fn store(
        &mut self,
        example: usize,
        row: &Tensor,
        projections: Option<&[(Tensor, Tensor)]>,
    ) -> Result<()> {
        if self.entries.get(example).is_none_or(Option::is_some) {
            return Ok(());
        }
        let bytes =
            bytes_of(row) + projections.map_or(0, |p| p.iter().map(|(k, v)| bytes_of(k) + bytes_of(v)).sum());
        if self.used + bytes > self.budget {
            return Ok(());
        }
        let host =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_device(Device::Cpu)?.f_detach_copy()?) };
        let projections = match projections {
            Some(p) => Some(
                p.iter()
                    .map(|(k, v)| Ok((host(k)?, host(v)?)))
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        self.entries[example] = Some(Entry {
            embeddings: host(row)?,
            projections,
        });
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
            cross_projections: self.projections == Projections::Kept,
        }
    }
}

fn bytes_of(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Per layer, the rows' key and value projections stacked into the batch's (every row has them: the cache
/// keeps projections for all of its examples or for none).
fn stack_projections(rows: Vec<Option<Vec<(Tensor, Tensor)>>>) -> Result<CrossProjections> {
    let rows = rows
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::invalid("feature cache: a row's cross-attention projections are missing"))?;
    let layers = rows.first().map_or(0, Vec::len);
    let layers = (0..layers)
        .map(|l| {
            let keys: Vec<&Tensor> = rows.iter().map(|r| &r[l].0).collect();
            let values: Vec<&Tensor> = rows.iter().map(|r| &r[l].1).collect();
            Ok((Tensor::f_stack(&keys, 0)?, Tensor::f_stack(&values, 0)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CrossProjections { layers })
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
