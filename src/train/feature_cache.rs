//! The frozen vision tower's feature cache: when nothing in the vision tower trains and nothing in it is
//! random (no trained parameter, no dropout, no augmentation), an image's embeddings are the same in every
//! epoch, so each example's are computed once and reused by later epochs.
//!
//! What is cached is exactly what the uncached step computes: the tower's output for the example under the
//! training context, in the kind it is produced in (float32, or bf16/fp16 under mixed precision), copied to
//! host memory. Entries are keyed by the dataset's example index and held until the run ends, within a budget
//! of host memory (`train(feature_cache=...)`, [`DEFAULT_BUDGET_MB`] by default); past it, the remaining
//! examples are recomputed every epoch. The batch source skips decoding the images of cached rows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Deserializer};
use tch::{Device, Tensor};

use super::task::TrainTask;
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

/// The embeddings held, by example index.
pub struct FeatureCache {
    entries: Vec<Option<Tensor>>,
    /// Which examples are held, shared with the batch source's thread (which then skips their pixels).
    /// An entry is never dropped during a run, so a row the thread saw held is still held when it is used.
    held: Arc<Vec<AtomicBool>>,
    budget: u64,
    used: u64,
    hits: u64,
    misses: u64,
}

impl FeatureCache {
    pub fn new(examples: usize, budget: u64) -> Self {
        Self {
            entries: (0..examples).map(|_| None).collect(),
            held: Arc::new((0..examples).map(|_| AtomicBool::new(false)).collect()),
            budget,
            used: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// The flags the batch source's thread reads.
    pub fn held(&self) -> Arc<Vec<AtomicBool>> {
        self.held.clone()
    }

    /// The image embeddings of a training micro-batch (`indices`, in order) on `device`. `pixel_values` holds
    /// the rows `with_pixels` marks (in order); those whose example is not held yet are computed and stored
    /// while the budget lasts, every other row comes from the cache (a row the batch thread prepared before
    /// its example was stored is served from the cache too). Computed as the uncached step computes them
    /// (the tower holds no trained weight, so no graph is kept), and torch's RNG is left as that step leaves
    /// it.
    pub fn images<T: TrainTask + ?Sized>(
        &mut self,
        model: &T,
        indices: &[usize],
        with_pixels: &[bool],
        pixel_values: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
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
        let mut rows = Vec::with_capacity(indices.len());
        let mut next = 0i64;
        for (&example, &computed_here) in indices.iter().zip(&compute) {
            if computed_here {
                let row = computed
                    .as_ref()
                    .ok_or_else(|| Error::invalid("feature cache: a row's embeddings are missing"))?
                    .f_get(next)?;
                next += 1;
                self.misses += 1;
                self.store(example, &row)?;
                rows.push(row);
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
                rows.push(held.f_to_device(device)?);
            }
        }
        match computed {
            // Every row computed here: the tower's own output, untouched.
            Some(all) if next == indices.len() as i64 => Ok(all),
            _ => Ok(Tensor::f_stack(&rows, 0)?),
        }
    }

    /// Keeps a host copy of `row` (one example's embeddings) when it fits in the budget.
    fn store(&mut self, example: usize, row: &Tensor) -> Result<()> {
        if self.entries.get(example).is_none_or(Option::is_some) {
            return Ok(());
        }
        let bytes = (row.numel() * row.kind().elt_size_in_bytes()) as u64;
        if self.used + bytes > self.budget {
            return Ok(());
        }
        let copy = row.f_detach()?.f_to_device(Device::Cpu)?.f_detach_copy()?;
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
        }
    }
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
