//! The training loop: batches prepared on a background thread, forward/backward, AdamW with schedule,
//! accumulation, clipping and (fp16) loss scaling, logging without per-step host reads, evaluation and
//! checkpoints. Everything here runs without Python; the bindings add a Python observer.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::checkpoint::{self, TrainerState, WeightsFormat};
use super::checkpointed_step::TrainedTowers;
use super::feature_cache::{self, CachedImages, FeatureCache, FeatureCacheReport, FeatureCacheSetting};
use super::optim::{clip_grad_norm, AdamW, LossScaler, Schedule};
use super::task::TrainTask;
use crate::blip::BlipForConditionalGeneration;
use crate::data::{Batch, BatchSource};
use crate::error::{Error, Result};
use crate::nn::ForwardContext;

/// Numeric precision of the frozen base during training (`mixed_precision`). Trainable weights always stay
/// float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Float32,
    BFloat16,
    Float16,
    /// bf16 on CUDA, float32 on the CPU ([`Precision::on`]).
    Auto,
}

impl Precision {
    /// `"auto" | "no" | "bf16" | "fp16"` (and the long names).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "no" | "fp32" | "float32" => Self::Float32,
            "bf16" | "bfloat16" => Self::BFloat16,
            "fp16" | "float16" => Self::Float16,
            "auto" => Self::Auto,
            other => {
                return Err(Error::invalid(format!(
                    "mixed_precision must be \"auto\", \"no\", \"bf16\" or \"fp16\", got {other:?}"
                )))
            }
        })
    }

    /// The precision on `device`: `Auto` becomes bf16 on CUDA, float32 on the CPU.
    pub fn on(self, device: Device) -> Self {
        match self {
            Self::Auto if device.is_cuda() => Self::BFloat16,
            Self::Auto => Self::Float32,
            other => other,
        }
    }

    fn kind(&self) -> Option<Kind> {
        match self {
            Self::Float32 | Self::Auto => None,
            Self::BFloat16 => Some(Kind::BFloat16),
            Self::Float16 => Some(Kind::Half),
        }
    }
}

/// Settings of one training run, read from `blip_peft.train`'s keyword arguments ([`Self::from_settings`]:
/// its names, transformers' `TrainingArguments` names where they exist), with their defaults and checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: i64,
    pub max_steps: Option<i64>,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    #[serde(rename = "adam_betas")]
    pub betas: (f64, f64),
    #[serde(rename = "adam_eps")]
    pub eps: f64,
    #[serde(rename = "lr_scheduler", deserialize_with = "by_name::schedule")]
    pub schedule: Schedule,
    pub warmup_steps: i64,
    pub warmup_ratio: f64,
    pub gradient_accumulation_steps: i64,
    pub max_grad_norm: f64,
    /// Label smoothing of the caption loss for this run (torch's `label_smoothing`; LAVIS trains BLIP with
    /// 0.1). None: the checkpoint's `text_config.label_smoothing`, as transformers' loss reads it.
    pub label_smoothing: Option<f64>,
    #[serde(rename = "mixed_precision", deserialize_with = "by_name::precision")]
    pub precision: Precision,
    /// Keep only each transformer layer's input from the forward pass and recompute the layers during the
    /// backward: activation memory grows with the number of layers instead of everything they compute.
    pub gradient_checkpointing: bool,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: i64,
    pub logging_steps: i64,
    pub output_dir: Option<PathBuf>,
    pub save_steps: Option<i64>,
    pub save_total_limit: Option<usize>,
    pub eval_steps: Option<i64>,
    /// The evaluation metric that picks the best step (transformers' `metric_for_best_model`): `"eval_loss"`
    /// (or `"loss"`), or a name the observer's [`Observer::score`] reports (`"CIDEr"`, also as `"eval_CIDEr"`).
    /// None with `load_best_model_at_end`: `"eval_loss"`, as transformers defaults it.
    pub metric_for_best_model: Option<String>,
    /// Whether a larger metric is better; None: true unless the metric's name ends in "loss" (transformers).
    pub greater_is_better: Option<bool>,
    /// Put the best evaluation's trained weights back into the model when training ends (and, with
    /// `output_dir`, save a checkpoint at every new best so that a resumed run can too).
    pub load_best_model_at_end: bool,
    /// The caption length limit (tokens, BOS and [SEP] included) the captions were tokenised to: checked
    /// here with the other settings (at least 2, or None); encoded tensors are used as given.
    pub max_length: Option<i64>,
    #[serde(rename = "resume_from_checkpoint", deserialize_with = "by_name::resume_from")]
    pub resume_from: Option<super::checkpoint::ResumeFrom>,
    /// The frozen vision tower's feature cache ([`feature_cache`]): used when its conditions hold, within
    /// this budget of host memory.
    pub feature_cache: FeatureCacheSetting,
    /// This process's rank and the number of processes (data parallelism; 0 and 1 when alone).
    #[serde(skip)]
    pub rank: usize,
    #[serde(skip)]
    pub world_size: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            learning_rate: 1e-4,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            label_smoothing: None,
            precision: Precision::Float32,
            gradient_checkpointing: false,
            shuffle: true,
            drop_last: false,
            seed: 0,
            logging_steps: 10,
            output_dir: None,
            save_steps: None,
            save_total_limit: None,
            eval_steps: None,
            metric_for_best_model: None,
            greater_is_better: None,
            load_best_model_at_end: false,
            max_length: None,
            resume_from: None,
            feature_cache: FeatureCacheSetting::default(),
            rank: 0,
            world_size: 1,
        }
    }
}

/// The settings given by name (`lr_scheduler="cosine"`, `mixed_precision="bf16"`, `resume_from_checkpoint=True`
/// or a folder).
mod by_name {
    use serde::de::{Deserializer, Error as _};
    use serde::Deserialize;

    use super::Precision;
    use crate::train::checkpoint::ResumeFrom;
    use crate::train::Schedule;

    pub fn schedule<'de, D: Deserializer<'de>>(d: D) -> Result<Schedule, D::Error> {
        Schedule::parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn precision<'de, D: Deserializer<'de>>(d: D) -> Result<Precision, D::Error> {
        Precision::parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn resume_from<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ResumeFrom>, D::Error> {
        Ok(match serde_json::Value::deserialize(d)? {
            serde_json::Value::Null | serde_json::Value::Bool(false) => None,
            serde_json::Value::Bool(true) => Some(ResumeFrom::Latest),
            serde_json::Value::String(dir) => Some(ResumeFrom::Folder(dir.into())),
            other => {
                return Err(D::Error::custom(format!(
                    "resume_from_checkpoint must be True or a checkpoint folder, got {other}"
                )))
            }
        })
    }
}

impl TrainConfig {
    /// The settings given as keyword arguments (absent ones take the defaults), checked; `rank` and
    /// `world_size` stay those of a process alone.
    pub fn from_settings(settings: serde_json::Value) -> Result<Self> {
        let config: Self = crate::config::settings_from_keywords(settings, "train()")?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch_size < 1 {
            return Err(Error::invalid("batch_size must be at least 1"));
        }
        if self.learning_rate < 0.0 || !self.learning_rate.is_finite() {
            return Err(Error::invalid(format!(
                "learning_rate must be a non-negative number, got {}",
                self.learning_rate
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid(format!(
                "weight_decay must be a non-negative finite number, got {}",
                self.weight_decay
            )));
        }
        if self.epochs < 1 && self.max_steps.is_none() {
            return Err(Error::invalid("epochs must be at least 1 (or give max_steps)"));
        }
        if self.max_steps.is_some_and(|m| m < 1) {
            return Err(Error::invalid("max_steps must be at least 1"));
        }
        if self.gradient_accumulation_steps < 1 {
            return Err(Error::invalid("gradient_accumulation_steps must be at least 1"));
        }
        if self.logging_steps < 1 {
            return Err(Error::invalid("logging_steps must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) || self.warmup_steps < 0 {
            return Err(Error::invalid(
                "warmup_ratio must be in [0, 1) and warmup_steps not negative",
            ));
        }
        let betas_ok = (0.0..1.0).contains(&self.betas.0) && (0.0..1.0).contains(&self.betas.1);
        if !(betas_ok && self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid(
                "adam_betas must be in [0, 1) and adam_eps positive",
            ));
        }
        for (name, v) in [("save_steps", self.save_steps), ("eval_steps", self.eval_steps)] {
            if v.is_some_and(|v| v < 1) {
                return Err(Error::invalid(format!("{name} must be at least 1")));
            }
        }
        if let Some(ls) = self.label_smoothing {
            if !(0.0..=1.0).contains(&ls) {
                return Err(Error::invalid(format!(
                    "label_smoothing must be in [0, 1], got {ls}"
                )));
            }
        }
        crate::data::check_max_length(self.max_length)?;
        if self.save_total_limit == Some(0) {
            return Err(Error::invalid("save_total_limit must be at least 1"));
        }
        if self.save_steps.is_some() && self.output_dir.is_none() {
            return Err(Error::invalid("save_steps needs output_dir"));
        }
        if self
            .metric_for_best_model
            .as_deref()
            .is_some_and(|m| matches!(metric_key(m).as_str(), "" | "eval_"))
        {
            return Err(Error::invalid(
                "metric_for_best_model must name a metric (e.g. \"CIDEr\" or \"eval_loss\")",
            ));
        }
        Ok(())
    }

    /// The metric that picks the best step, as it is named in an evaluation's [`Metrics`], and whether larger
    /// is better; None when no metric was asked for (neither `metric_for_best_model` nor
    /// `load_best_model_at_end`).
    pub fn best_metric(&self) -> Option<(String, bool)> {
        let name = match (&self.metric_for_best_model, self.load_best_model_at_end) {
            (Some(name), _) => name.as_str(),
            (None, true) => "loss",
            (None, false) => return None,
        };
        let greater = self.greater_is_better.unwrap_or(!name.ends_with("loss"));
        Some((metric_key(name), greater))
    }
}

/// A `metric_for_best_model` name as evaluations report it: `"loss"` and `"eval_loss"` are `"eval_loss"`;
/// other names lose transformers' `"eval_"` prefix (`"eval_CIDEr"` is `"CIDEr"`).
pub fn metric_key(name: &str) -> String {
    match name {
        "loss" | "eval_loss" => "eval_loss".into(),
        other => other
            .strip_prefix("eval_")
            .filter(|s| !s.is_empty())
            .unwrap_or(other)
            .into(),
    }
}

/// One evaluation's numbers by name, in the order they were computed (`eval_loss` first, then what the
/// observer scored); written to `trainer_state.json` as a JSON object in that order (NaN as null).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics(pub Vec<(String, f64)>);

impl Metrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }
}

impl Serialize for Metrics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, &Some(*value).filter(|v| v.is_finite()))?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Metrics {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Ordered;
        impl<'de> serde::de::Visitor<'de> for Ordered {
            type Value = Metrics;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of metric names and numbers")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Metrics, A::Error> {
                let mut out = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, Option<f64>>()? {
                    out.push((name, value.unwrap_or(f64::NAN)));
                }
                Ok(Metrics(out))
            }
        }
        d.deserialize_map(Ordered)
    }
}

/// The metrics of the evaluation at `step`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub step: i64,
    pub metrics: Metrics,
}

/// One optimizer step's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: i64,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub samples_per_second: f64,
    /// fp16 only: the step was skipped because its gradients overflowed.
    pub skipped: bool,
}

/// Whether training should go on after an observer was told something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Receives progress at every logging step and evaluation (the Python bindings call back into Python here).
///
/// `model` is the model being trained, lent for the call (read-only: a callback may caption samples with it);
/// the run does not touch it until the call returns.
/// `M` is the model being trained (the captioner by default; any [`TrainTask`]).
pub trait Observer<M: ?Sized = BlipForConditionalGeneration> {
    fn on_log(&mut self, model: &M, logs: &[StepLog], total_steps: i64) -> Result<Control>;
    /// After an evaluation: its metrics (`eval_loss`, then what [`Self::score`] added).
    fn on_eval(&mut self, model: &M, step: i64, metrics: &Metrics) -> Result<Control>;
    /// Metrics of the model at an evaluation step besides the evaluation loss (the bindings' caption scores of
    /// captions generated for the evaluation images), in the order to report them. Called on rank 0 only, with
    /// the model in no training state of its own: whatever it runs must choose its context (generation's has
    /// no dropout). Nothing by default; None: stop the run (e.g. Ctrl-C while scoring), this step unscored.
    fn score(&mut self, _model: &M, _step: i64) -> Result<Option<Metrics>> {
        Ok(Some(Metrics::default()))
    }
    /// Called after every optimizer step (cheap: e.g. a check for Ctrl-C).
    fn on_step_end(&mut self) -> Result<Control> {
        Ok(Control::Continue)
    }
}

/// An observer that does nothing (Rust callers and tests).
pub struct Silent;

impl<M: ?Sized> Observer<M> for Silent {
    fn on_log(&mut self, _: &M, _: &[StepLog], _: i64) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_eval(&mut self, _: &M, _: i64, _: &Metrics) -> Result<Control> {
        Ok(Control::Continue)
    }
}

/// The collectives data-parallel training needs (implemented over `torch.distributed` by the bindings).
/// Every process calls them in the same order.
pub trait Collective {
    /// Replaces `t` (a flat buffer) by its mean over all processes, in place.
    fn all_reduce_mean(&mut self, t: &Tensor) -> Result<()>;
    /// The largest of every process's `value`.
    fn all_reduce_max(&mut self, value: f64) -> Result<f64>;
    /// Whether every process passed the same `value`.
    fn all_equal(&mut self, value: f64) -> Result<bool>;
}

/// What a run returns.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub history: Vec<StepLog>,
    pub eval_history: Vec<(i64, f64)>,
    /// Every evaluation's metrics (the evaluation loss and what the observer scored), resumed runs' included.
    pub metric_history: Vec<EvalRecord>,
    /// The best value of the chosen metric so far, its step and the checkpoint saved at that step (if any).
    pub best_metric: Option<f64>,
    pub best_global_step: Option<i64>,
    pub best_model_checkpoint: Option<PathBuf>,
    pub global_step: i64,
    pub total_steps: i64,
    /// Stopped by the observer (e.g. Ctrl-C) before the planned end.
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    /// What the frozen vision tower's feature cache did (or why it was not used).
    pub feature_cache: FeatureCacheReport,
}

/// A deterministic permutation of `0..n` for (`seed`, `epoch`): splitmix64 driving Fisher-Yates.
pub fn epoch_order(n: usize, seed: i64, epoch: i64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if !shuffle {
        return order;
    }
    let mut state =
        (seed as u64) ^ ((epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// This process's share of an epoch's order: `DistributedSampler`'s interleaved split.
pub fn shard(order: &[usize], rank: usize, world: usize, drop_last: bool) -> Vec<usize> {
    let world = world.max(1);
    if world == 1 {
        return order.to_vec();
    }
    let n = order.len();
    let total = if drop_last {
        n / world * world
    } else {
        n.div_ceil(world) * world
    };
    (rank..total).step_by(world).map(|i| order[i % n]).collect()
}

/// The geometry of a run: micro-batches per epoch and optimizer steps.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub samples: usize,
    pub micro_per_epoch: i64,
    pub steps_per_epoch: i64,
    pub total_steps: i64,
    pub warmup: i64,
}

impl Plan {
    pub fn new(samples: usize, config: &TrainConfig) -> Result<Self> {
        if samples == 0 {
            return Err(Error::invalid("the training dataset is empty"));
        }
        let world = config.world_size.max(1);
        if config.drop_last && samples < world {
            return Err(Error::invalid(format!(
                "the dataset has {samples} samples, fewer than the {world} processes (drop_last)"
            )));
        }
        // Each process sees its shard of every epoch (DistributedSampler's split: padded by repeating the
        // order's start, or truncated with drop_last), so `batch_size` is per process.
        let per_rank = if config.drop_last {
            samples / world
        } else {
            samples.div_ceil(world)
        };
        let bs = config.batch_size;
        let micro = if config.drop_last {
            per_rank / bs
        } else {
            per_rank.div_ceil(bs)
        } as i64;
        if micro == 0 {
            return Err(Error::invalid(format!(
                "the dataset has {samples} samples, fewer than one batch of {bs} with drop_last"
            )));
        }
        let accum = config.gradient_accumulation_steps;
        let steps_per_epoch = (micro + accum - 1) / accum;
        let total_steps = config.max_steps.unwrap_or(config.epochs * steps_per_epoch);
        let warmup = if config.warmup_steps > 0 {
            config.warmup_steps
        } else {
            (config.warmup_ratio * total_steps as f64).ceil() as i64
        };
        Ok(Self {
            samples,
            micro_per_epoch: micro,
            steps_per_epoch,
            total_steps,
            warmup,
        })
    }

    /// The micro-batches (sample indices) of optimizer step `step`, with the epoch they belong to.
    fn micro_batches(
        &self,
        step: i64,
        config: &TrainConfig,
        order_cache: &mut Option<(i64, Vec<usize>)>,
    ) -> (i64, Vec<Vec<usize>>) {
        let epoch = step / self.steps_per_epoch;
        let within = step % self.steps_per_epoch;
        if order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            *order_cache = Some((
                epoch,
                epoch_order(self.samples, config.seed, epoch, config.shuffle),
            ));
        }
        let order = &order_cache.as_ref().map(|(_, o)| o.clone()).unwrap_or_default();
        let order = &shard(order, config.rank, config.world_size, config.drop_last);
        let accum = config.gradient_accumulation_steps;
        let bs = config.batch_size;
        let first = within * accum;
        let last = (first + accum).min(self.micro_per_epoch);
        let batches = (first..last)
            .map(|m| {
                let start = m as usize * bs;
                order[start..(start + bs).min(order.len())].to_vec()
            })
            .collect();
        (epoch, batches)
    }
}

/// One micro-batch as the prefetch thread prepared it: its examples, and with the feature cache, which rows
/// have their pixels in the batch (the others' embeddings are cached).
struct Micro {
    indices: Vec<usize>,
    with_pixels: Option<Vec<bool>>,
    batch: Result<Batch>,
}

/// The micro-batches of one optimizer step, with the step and epoch they belong to.
type PlannedStep = (i64, i64, Vec<Micro>);

/// Prepares the planned micro-batches on a background thread, two steps ahead of the model. Dropping it
/// stops the thread and waits for it, so no batch is being built while the process shuts down.
struct Prefetcher {
    batches: Option<Receiver<PlannedStep>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prefetcher {
    /// With `held` (the feature cache's flags), rows whose embeddings are cached come without pixels.
    fn start(
        source: Box<dyn BatchSource>,
        plan: Plan,
        config: TrainConfig,
        first_step: i64,
        held: Option<std::sync::Arc<Vec<std::sync::atomic::AtomicBool>>>,
    ) -> Self {
        let (tx, rx) = sync_channel(2);
        let thread = std::thread::spawn(move || {
            let mut cache = None;
            for step in first_step..plan.total_steps {
                let (epoch, micro) = plan.micro_batches(step, &config, &mut cache);
                // Augmented draws depend only on (seed, epoch, example), so a resumed run repeats them.
                let batches = micro
                    .into_iter()
                    .map(|indices| match &held {
                        Some(held) => {
                            let with_pixels = feature_cache::rows_needing_pixels(held, &indices);
                            Micro {
                                batch: source.train_batch_with_pixels_of(&indices, &with_pixels),
                                with_pixels: Some(with_pixels),
                                indices,
                            }
                        }
                        None => Micro {
                            batch: source.train_batch(&indices, epoch, config.seed),
                            with_pixels: None,
                            indices,
                        },
                    })
                    .collect();
                if tx.send((step, epoch, batches)).is_err() {
                    return; // the trainer stopped early
                }
            }
        });
        Self {
            batches: Some(rx),
            thread: Some(thread),
        }
    }

    fn next(&self) -> Option<PlannedStep> {
        self.batches.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.batches.take(); // a pending send fails now, and the thread returns
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Holds the base weights' original values while training runs them in lower precision.
struct PrecisionGuard {
    originals: Vec<(Tensor, Tensor)>,
}

impl PrecisionGuard {
    /// Lowers the frozen float weights to `kind` and makes both towers compute in it. Trained weights
    /// stay in float32 (the layers cast them on the way in, as autocast does), so they must be float32.
    fn lower<T: TrainTask + ?Sized>(model: &mut T, kind: Option<Kind>) -> Result<Self> {
        let Some(kind) = kind else {
            return Ok(Self { originals: vec![] });
        };
        let params = model.named_parameters();
        if let Some((name, t)) = params
            .iter()
            .find(|(_, t)| t.requires_grad() && t.kind() != Kind::Float)
        {
            return Err(Error::invalid(format!(
                "mixed precision trains float32 weights over a half-precision frozen base, but the trained weight \
                 {name} is {:?}; load the model in float32 (mixed_precision lowers the frozen weights itself) or \
                 use mixed_precision=\"no\"",
                t.kind()
            )));
        }
        let _guard = tch::no_grad_guard();
        let mut originals = Vec::new();
        for (_, t) in params {
            if t.requires_grad() || t.kind() == kind || !crate::nn::is_float_kind(t.kind()) {
                continue;
            }
            // The original values wait in host memory and come back when training ends.
            let original = t.f_to_device(Device::Cpu)?.f_detach_copy()?;
            let mut target = t.shallow_clone();
            target.f_set_data(&t.f_to_kind(kind)?)?;
            originals.push((t, original));
        }
        Ok(Self { originals })
    }

    fn restore(self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (t, original) in self.originals {
            let mut target = t.shallow_clone();
            target.f_set_data(&original.f_to_device(t.device())?)?;
        }
        Ok(())
    }
}

/// Runs training.
pub struct Trainer;

impl Trainer {
    /// Trains `model` (any BLIP head: [`TrainTask`]) on `train`, evaluating on `eval`.
    pub fn run<T: TrainTask>(
        model: &mut T,
        train: Box<dyn BatchSource>,
        eval: Option<Box<dyn BatchSource>>,
        config: &TrainConfig,
        format: &WeightsFormat,
        observer: &mut dyn Observer<T>,
        collective: Option<&mut dyn Collective>,
    ) -> Result<TrainOutcome> {
        config.validate()?;
        if let (Some(steps), None) = (config.eval_steps, &eval) {
            // transformers' Trainer refuses an evaluation strategy without an eval_dataset the same way.
            return Err(Error::invalid(format!(
                "eval_steps={steps} asks for an evaluation every {steps} steps, but no eval_dataset was given; \
                 pass eval_dataset or leave eval_steps unset"
            )));
        }
        if eval.is_none() {
            let asked = if config.load_best_model_at_end {
                Some("load_best_model_at_end=True")
            } else if config.metric_for_best_model.is_some() {
                Some("metric_for_best_model")
            } else {
                None
            };
            if let Some(what) = asked {
                return Err(Error::invalid(format!(
                    "{what} picks the best step by evaluating, but no eval_dataset was given; pass eval_dataset \
                     or leave it unset"
                )));
            }
        }
        let plan = Plan::new(train.len(), config)?;
        let trainable: Vec<(String, Tensor)> = model
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let extra = model.extra_trained();
        if trainable.is_empty() && extra.is_empty() {
            return Err(Error::invalid(
                "the model has no trainable parameters (an adapter loaded with is_trainable=False, or everything \
                 frozen); load the adapter with is_trainable=True or unfreeze parameters",
            ));
        }
        if let Some(dir) = &config.output_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("output_dir {} is not writable", dir.display()), e))?;
            let probe = dir.join(format!(".write-test-{}", std::process::id()));
            std::fs::write(&probe, b"")
                .map_err(|e| Error::io(format!("output_dir {} is not writable", dir.display()), e))?;
            let _ = std::fs::remove_file(probe);
        }
        let device = model.device();
        let mut optimizer = AdamW::new(trainable, config.betas, config.eps, config.weight_decay)?;
        for (name, t) in extra {
            optimizer.push_without_decay(name, t)?;
        }
        let precision = config.precision.on(device);
        let mut scaler = match precision {
            Precision::Float16 => Some(LossScaler::new(65536.0, device)?),
            _ => None,
        };
        let mut state = TrainerState {
            global_step: 0,
            total_steps: plan.total_steps,
            seed: config.seed,
            loss_scale: None,
            growth_tracker: None,
            trainable: optimizer.states.iter().map(|s| s.name.clone()).collect(),
            history: Vec::new(),
            eval_history: Vec::new(),
            metric_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
        };
        if let (Some(out), 0) = (&config.output_dir, config.rank) {
            // What a run killed midway left behind (hidden temporaries, never loaded) goes first.
            checkpoint::remove_leftovers(out);
        }
        if let Some(from) = &config.resume_from {
            let dir = from.folder(config.output_dir.as_deref())?;
            state = resume(&dir, model, &mut optimizer, format)?;
            state.best_model_checkpoint = best_checkpoint_after_resume(&state, &dir, config)?;
            if let (Some(s), Some(scale)) = (&mut scaler, state.loss_scale) {
                let _ = s.scale.f_fill_(scale)?;
                let _ = s.growth_tracker.f_fill_(state.growth_tracker.unwrap_or(0))?;
            }
            state.total_steps = plan.total_steps;
        }
        let refused = feature_cache::frozen_refusal(model, train.as_ref())?;
        let frozen_images = refused.is_none();
        let (cache, mut cache_report) = match (config.feature_cache, refused) {
            (FeatureCacheSetting::Budget { bytes }, None) => (
                Some(FeatureCache::new(
                    train.len(),
                    bytes,
                    !config.gradient_checkpointing,
                )),
                FeatureCacheReport::default(),
            ),
            (setting, reason) => (
                None,
                FeatureCacheReport {
                    reason: match (setting, reason) {
                        (FeatureCacheSetting::Budget { .. }, Some(reason)) => Some(reason),
                        _ => Some("turned off (feature_cache=False)".into()),
                    },
                    ..Default::default()
                },
            ),
        };
        let guard = PrecisionGuard::lower(model, precision.kind())?;
        let towers = TrainedTowers::of(model);
        let flush = super::denormals::FlushDenormals::enable();
        let keep_freed = crate::freed_memory::KeepFreedMemory::enable();
        let mut run = TrainingRun {
            model,
            device,
            config,
            format,
            observer,
            // (re-borrowed: the run holds every reference for one lifetime)
            collective: collective.map(|c| c as &mut dyn Collective),
            eval,
            plan,
            optimizer,
            scaler,
            compute_kind: precision.kind(),
            towers,
            state,
            pending: Vec::new(),
            last_checkpoint: None,
            window_start: Instant::now(),
            window_samples: 0,
            best_weights: None,
            cache,
            frozen_images,
        };
        let result = run.train(train);
        let TrainingRun {
            mut optimizer,
            state,
            last_checkpoint,
            best_weights,
            cache,
            ..
        } = run;
        if let Some(c) = &cache {
            cache_report = c.report();
        }
        drop(cache);
        drop(flush);
        drop(keep_freed);
        guard.restore()?;
        let _ = optimizer.zero_grad();
        let interrupted = result?;
        if config.load_best_model_at_end {
            load_best(model, &optimizer, &state, best_weights, format)?;
        }
        Ok(TrainOutcome {
            history: state.history,
            eval_history: state.eval_history,
            metric_history: state.metric_history,
            best_metric: state.best_metric,
            best_global_step: state.best_global_step,
            best_model_checkpoint: state.best_model_checkpoint,
            global_step: state.global_step,
            total_steps: plan.total_steps,
            interrupted,
            last_checkpoint,
            feature_cache: cache_report,
        })
    }
}

/// One training run under way: the model, its optimizer and scaler, the run's state, and what the loop
/// carries from step to step. Each phase of an optimizer step is one method.
struct TrainingRun<'a, T: TrainTask> {
    model: &'a mut T,
    device: Device,
    config: &'a TrainConfig,
    format: &'a WeightsFormat<'a>,
    observer: &'a mut dyn Observer<T>,
    collective: Option<&'a mut dyn Collective>,
    eval: Option<Box<dyn BatchSource>>,
    plan: Plan,
    optimizer: AdamW,
    scaler: Option<LossScaler>,
    /// The kind activations are computed in under mixed precision (`None`: the weights' own).
    compute_kind: Option<Kind>,
    /// Which towers train (for the checkpointed step), read once.
    towers: TrainedTowers,
    state: TrainerState,
    /// Per-step values stay on the device until a logging step reads them all at once.
    pending: Vec<PendingStep>,
    last_checkpoint: Option<PathBuf>,
    /// Since the last logging step: when it was, and the samples this process trained on.
    window_start: Instant,
    window_samples: usize,
    /// `load_best_model_at_end`: host copies of the trained weights at the best evaluation of this run, in
    /// optimizer order (a best from before a resume is read back from its checkpoint instead).
    best_weights: Option<Vec<Tensor>>,
    /// The frozen vision tower's feature cache, when the run may use it.
    cache: Option<FeatureCache>,
    /// Whether the vision tower is frozen and deterministic ([`feature_cache::frozen_refusal`]): then the step
    /// computes image features image by image, cached or not ([`feature_cache::frozen_images`]).
    frozen_images: bool,
}

impl<T: TrainTask> TrainingRun<'_, T> {
    /// The planned steps from the state's `global_step` on, batches prepared on a background thread.
    /// Returns whether the run was stopped (by an observer, on any process) before the end.
    fn train(&mut self, source: Box<dyn BatchSource>) -> Result<bool> {
        if let Some(c) = self.collective.as_deref_mut() {
            check_ranks_agree(c, &self.optimizer, source.len(), self.plan.total_steps)?;
        }
        let held = self.cache.as_ref().map(FeatureCache::held);
        let batches = Prefetcher::start(
            source,
            self.plan,
            self.config.clone(),
            self.state.global_step,
            held,
        );
        self.window_start = Instant::now();
        self.window_samples = 0;
        while self.state.global_step < self.plan.total_steps {
            let Some((step, epoch, micro)) = batches.next() else {
                return Err(Error::invalid("the data loader stopped unexpectedly"));
            };
            debug_assert_eq!(step, self.state.global_step);
            let (loss, samples) = self.forward_backward(step, micro)?;
            let loss = self.reduce_gradients(loss)?;
            self.optimizer_step(step, epoch, loss, samples)?;
            if self.report_and_save()? == Control::Stop {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Forward and backward over the micro-batches of optimizer step `step`, the gradients accumulating.
    /// Returns the step's mean loss (on the device) and its number of samples.
    fn forward_backward(&mut self, step: i64, micro: Vec<Micro>) -> Result<(Tensor, usize)> {
        let (model, config, device) = (&*self.model, self.config, self.device);
        let group = micro.len() as f64;
        let mut step_loss = Tensor::f_zeros([], (Kind::Float, device))?;
        let mut step_samples = 0;
        for (
            m,
            Micro {
                indices,
                with_pixels,
                batch,
            },
        ) in micro.into_iter().enumerate()
        {
            let batch = batch?;
            step_samples += batch.input_ids.size()[0] as usize;
            // Dropout draws depend only on (seed, step, micro-batch), so a resumed run repeats them.
            let dropout_seed = config
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(step * 64 + m as i64);
            tch::manual_seed(dropout_seed);
            let cx = ForwardContext {
                label_smoothing: config.label_smoothing,
                ..ForwardContext::training(dropout_seed, self.compute_kind)
            };
            // With the feature cache, the image features (cached, or computed and kept); with a frozen vision
            // tower, the same computed here; else the pixels, for the tower inside the loss.
            let cached = match (self.cache.as_mut(), &with_pixels) {
                (Some(cache), Some(with_pixels)) => {
                    Some(cache.images(model, &indices, with_pixels, &batch.pixel_values, &cx)?)
                }
                _ if self.frozen_images => Some(feature_cache::frozen_images(
                    model,
                    &batch.pixel_values,
                    !config.gradient_checkpointing,
                    &cx,
                )?),
                _ => None,
            };
            let pixel_values = match &cached {
                Some(_) => batch.pixel_values.shallow_clone(),
                None => model.check_pixel_values(&batch.pixel_values, &cx)?,
            };
            // What the loss is scaled by before its backward: 1/accumulation, times the fp16 loss scale.
            let multiplier = match self.scaler.as_ref() {
                Some(s) => s.scale.f_squeeze()?.f_div_scalar(group)?,
                None => Tensor::f_full([], 1.0 / group, (Kind::Float, device))?,
            };
            let loss = if config.gradient_checkpointing {
                model.loss_backward_checkpointed(
                    self.towers,
                    &pixel_values,
                    cached.map(|c| c.embeddings),
                    &batch,
                    &multiplier,
                    &cx,
                )?
            } else {
                let loss = match cached {
                    Some(CachedImages {
                        embeddings,
                        projected: Some(projected),
                    }) => model.loss_over_projected_images(&batch, &embeddings, &projected, &cx)?,
                    Some(CachedImages { embeddings, .. }) => {
                        model.loss_over_images(&batch, &embeddings, &cx)?
                    }
                    None => {
                        let image = model.encode_images(&pixel_values, &cx)?;
                        model.loss_over_images(&batch, &image, &cx)?
                    }
                };
                if let Some(loss) = &loss {
                    loss.f_mul(&multiplier)?.f_backward()?;
                }
                loss
            };
            // A batch with nothing to learn from (retrieval: pairs of one image only) adds no gradient; every
            // trained tensor still gets one (zeros), so data-parallel ranks all-reduce buckets of one size.
            let Some(loss) = loss else {
                for s in &self.optimizer.states {
                    if !s.param.grad().defined() {
                        s.param.f_mul_scalar(0.0)?.f_sum(Kind::Float)?.f_backward()?;
                    }
                }
                continue;
            };
            step_loss = step_loss.f_add(&loss.f_detach()?.f_div_scalar(group)?)?;
        }
        Ok((step_loss, step_samples))
    }

    /// Data parallelism: every gradient and the step's loss averaged over the processes, in one flat bucket
    /// per optimizer step. Returns the averaged loss (the loss itself when alone).
    fn reduce_gradients(&mut self, step_loss: Tensor) -> Result<Tensor> {
        let Some(c) = self.collective.as_deref_mut() else {
            return Ok(step_loss);
        };
        let grads = self.optimizer.grads();
        let mut parts = grads
            .iter()
            .map(|g| g.f_flatten(0, -1).map_err(Error::from))
            .collect::<Result<Vec<_>>>()?;
        parts.push(step_loss.f_view([1])?.f_to_kind(Kind::Float)?);
        let flat = Tensor::f_cat(&parts, 0)?;
        c.all_reduce_mean(&flat)?;
        let _guard = tch::no_grad_guard();
        let mut offset = 0;
        for g in &grads {
            let n = g.numel() as i64;
            let mut g = g.shallow_clone();
            g.f_copy_(&flat.f_narrow(0, offset, n)?.f_view_as(&g)?)?;
            offset += n;
        }
        Ok(flat.f_narrow(0, offset, 1)?.f_squeeze()?)
    }

    /// The update of step `step` (of `epoch`): gradients unscaled (fp16) and clipped, AdamW at the
    /// schedule's learning rate (skipped when fp16 gradients overflowed), gradients cleared. The step's loss
    /// and gradient norm wait on the device for the next logging step.
    fn optimizer_step(&mut self, step: i64, epoch: i64, loss: Tensor, samples: usize) -> Result<()> {
        let (config, plan) = (self.config, self.plan);
        let grads = self.optimizer.grads();
        let found_inf = match self.scaler.as_ref() {
            Some(s) => Some(s.unscale(&grads)?),
            None => None,
        };
        let grad_norm = clip_grad_norm(&grads, config.max_grad_norm)?;
        let lr = config.learning_rate * config.schedule.factor(step, plan.warmup, plan.total_steps);
        let skipped = match (&found_inf, self.scaler.as_mut()) {
            (Some(inf), Some(s)) => {
                // A step with overflowed gradients is skipped (this reads one flag back, as torch's GradScaler does).
                let overflow = f64::try_from(inf.f_sum(Kind::Float)?)? > 0.0;
                if !overflow {
                    self.optimizer.step(lr)?;
                }
                s.update(inf)?;
                overflow
            }
            _ => {
                self.optimizer.step(lr)?;
                false
            }
        };
        self.optimizer.zero_grad()?;
        self.state.global_step += 1;
        self.window_samples += samples;
        let epoch_f = epoch as f64 + ((step % plan.steps_per_epoch) + 1) as f64 / plan.steps_per_epoch as f64;
        self.pending.push(PendingStep {
            step: self.state.global_step,
            epoch: epoch_f,
            lr,
            loss,
            grad_norm,
            skipped,
        });
        Ok(())
    }

    /// After an update: logging, evaluation and checkpoints when due, and the observer's say. Every process
    /// stops together, or the others would wait forever at the next all-reduce; a stop saves a checkpoint.
    fn report_and_save(&mut self) -> Result<Control> {
        let (config, step) = (self.config, self.state.global_step);
        let at_end = step >= self.plan.total_steps;
        let log_now = step % config.logging_steps == 0 || at_end;
        let save_now =
            config.save_steps.is_some_and(|s| step % s == 0) || (at_end && config.output_dir.is_some());
        let eval_now = self.eval.is_some() && (config.eval_steps.is_some_and(|s| step % s == 0) || at_end);
        let mut control = Control::Continue;
        if log_now || save_now || eval_now {
            control = self.log()?;
        }
        let mut save_now = save_now;
        if eval_now {
            let (eval_control, new_best) = self.evaluate()?;
            if eval_control == Control::Stop {
                control = Control::Stop;
            }
            // load_best_model_at_end with output_dir: every new best is checkpointed (transformers'
            // save_strategy="best" on top of save_steps), so a resumed run can still load it at its end.
            save_now |= new_best && config.load_best_model_at_end && config.output_dir.is_some();
        }
        if self.observer.on_step_end()? == Control::Stop {
            control = Control::Stop;
        }
        if let Some(c) = self.collective.as_deref_mut() {
            let any = c.all_reduce_max(if control == Control::Stop { 1.0 } else { 0.0 })?;
            control = if any > 0.0 {
                Control::Stop
            } else {
                Control::Continue
            };
        }
        if save_now || control == Control::Stop {
            self.save()?;
        }
        Ok(control)
    }

    /// Reads the pending steps back in one go, tells the observer (rank 0), and checks that the processes'
    /// weights still agree.
    fn log(&mut self) -> Result<Control> {
        let config = self.config;
        let elapsed = self.window_start.elapsed().as_secs_f64().max(1e-9);
        let rate = (self.window_samples * config.world_size.max(1)) as f64 / elapsed;
        let logs = read_pending(&mut self.pending, rate)?;
        self.window_start = Instant::now();
        self.window_samples = 0;
        self.state.history.extend(logs.iter().cloned());
        let mut control = Control::Continue;
        if config.rank == 0 {
            control = self.observer.on_log(self.model, &logs, self.plan.total_steps)?;
        }
        if let Some(c) = self.collective.as_deref_mut() {
            check_in_sync(c, &self.optimizer, self.state.global_step)?;
        }
        Ok(control)
    }

    /// The evaluation loss (each process on its share) and the observer's scores (rank 0), recorded, the best
    /// metric updated, and told to the observer (rank 0). Returns the observer's say and whether this step is
    /// a new best.
    fn evaluate(&mut self) -> Result<(Control, bool)> {
        let Some(source) = &self.eval else {
            return Ok((Control::Continue, false));
        };
        let cx = ForwardContext {
            compute_kind: self.compute_kind,
            label_smoothing: self.config.label_smoothing,
            ..ForwardContext::INFERENCE
        };
        let loss = evaluate_sharded(
            self.model,
            source.as_ref(),
            self.config,
            self.collective.as_deref_mut(),
            &cx,
        )?;
        let step = self.state.global_step;
        self.state.eval_history.push((step, loss));
        let mut metrics = Metrics(vec![("eval_loss".into(), loss)]);
        let mut stop = false;
        if self.config.rank == 0 {
            match self.observer.score(self.model, step)? {
                Some(scores) => metrics
                    .0
                    .extend(scores.0.into_iter().filter(|(n, _)| n != "eval_loss")),
                None => stop = true,
            }
        }
        if let Some(c) = self.collective.as_deref_mut() {
            stop = c.all_reduce_max(if stop { 1.0 } else { 0.0 })? > 0.0;
        }
        if stop {
            // Stopped while scoring: the step keeps its loss, the best stays as it was.
            self.state.metric_history.push(EvalRecord { step, metrics });
            return Ok((Control::Stop, false));
        }
        let new_best = self.update_best(step, &metrics)?;
        let control = if self.config.rank == 0 {
            self.observer.on_eval(self.model, step, &metrics)?
        } else {
            Control::Continue
        };
        self.state.metric_history.push(EvalRecord { step, metrics });
        Ok((control, new_best))
    }

    /// Compares this evaluation's chosen metric with the best so far (transformers' strict comparison, so
    /// the first of equal values stays best; NaN is never best); a new best is recorded, and with
    /// `load_best_model_at_end` its trained weights are copied to host memory. Every process takes the
    /// value rank 0 saw, so all of them agree on the best step.
    fn update_best(&mut self, step: i64, metrics: &Metrics) -> Result<bool> {
        let Some((key, greater)) = self.config.best_metric() else {
            return Ok(false);
        };
        let value = match (self.config.rank, metrics.get(&key)) {
            (0, Some(v)) => v,
            (0, None) => {
                return Err(Error::invalid(format!(
                    "metric_for_best_model is {key:?}, which the evaluation does not report; it reports {}",
                    metrics.names().join(", ")
                )))
            }
            _ => f64::NEG_INFINITY,
        };
        let value = match self.collective.as_deref_mut() {
            Some(c) => c.all_reduce_max(value)?,
            None => value,
        };
        let best = self
            .state
            .best_metric
            .unwrap_or(if greater { f64::NEG_INFINITY } else { f64::INFINITY });
        let better = if greater { value > best } else { value < best };
        if !better {
            return Ok(false);
        }
        self.state.best_metric = Some(value);
        self.state.best_global_step = Some(step);
        if self.config.load_best_model_at_end {
            let _guard = tch::no_grad_guard();
            let copies = self
                .optimizer
                .states
                .iter()
                .map(|s| Ok(s.param.f_to_device(Device::Cpu)?.f_detach_copy()?))
                .collect::<Result<Vec<_>>>()?;
            self.best_weights = Some(copies);
        }
        Ok(true)
    }

    /// A checkpoint of the current step in `output_dir` (written by rank 0; the others note its folder).
    fn save(&mut self) -> Result<()> {
        let Some(dir) = &self.config.output_dir else {
            return Ok(());
        };
        if let Some(s) = self.scaler.as_ref() {
            self.state.loss_scale = Some(f64::try_from(s.scale.f_squeeze()?)?);
            self.state.growth_tracker = Some(i64::try_from(s.growth_tracker.f_squeeze()?)?);
        }
        if self.state.best_global_step == Some(self.state.global_step) {
            self.state.best_model_checkpoint = Some(checkpoint::checkpoint_dir(dir, self.state.global_step));
        }
        self.last_checkpoint = if self.config.rank == 0 {
            Some(checkpoint::save(
                dir,
                self.model,
                &self.optimizer,
                &self.state,
                self.format,
                self.config.save_total_limit,
            )?)
        } else {
            Some(checkpoint::checkpoint_dir(dir, self.state.global_step))
        };
        Ok(())
    }
}

/// A finished step whose loss and gradient norm are still on the device.
struct PendingStep {
    step: i64,
    epoch: f64,
    lr: f64,
    loss: Tensor,
    grad_norm: Tensor,
    skipped: bool,
}

/// Reads the pending steps' values back in one go; fails naming the first step whose loss is not finite.
fn read_pending(pending: &mut Vec<PendingStep>, rate: f64) -> Result<Vec<StepLog>> {
    if pending.is_empty() {
        return Ok(vec![]);
    }
    let losses = Tensor::f_stack(
        &pending.iter().map(|p| p.loss.shallow_clone()).collect::<Vec<_>>(),
        0,
    )?;
    let norms = Tensor::f_stack(
        &pending
            .iter()
            .map(|p| p.grad_norm.f_to_kind(Kind::Float).map_err(Error::from))
            .collect::<Result<Vec<_>>>()?,
        0,
    )?;
    let losses = Vec::<f64>::try_from(losses.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
    let norms = Vec::<f64>::try_from(norms.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
    let mut logs = Vec::with_capacity(pending.len());
    for (
        i,
        PendingStep {
            step,
            epoch,
            lr,
            skipped,
            ..
        },
    ) in pending.drain(..).enumerate()
    {
        if !losses[i].is_finite() && !skipped {
            return Err(Error::invalid(format!(
                "the loss became {} at step {step}; training stopped (lower the learning rate, or use bf16/fp32). \
                 Checkpoints written before this step are intact.",
                losses[i]
            )));
        }
        logs.push(StepLog {
            step,
            epoch,
            loss: losses[i],
            learning_rate: lr,
            grad_norm: norms[i],
            samples_per_second: rate,
            skipped,
        });
    }
    Ok(logs)
}

/// Fails naming the step when the trained weights differ between processes (a cheap checksum).
fn check_in_sync(c: &mut dyn Collective, optimizer: &AdamW, step: i64) -> Result<()> {
    let mut sum = 0.0;
    for s in &optimizer.states {
        sum += f64::try_from(s.param.f_to_kind(Kind::Double)?.f_sum(Kind::Double)?)?;
    }
    if !c.all_equal(sum)? {
        return Err(Error::invalid(format!(
            "the trained weights differ between processes at step {step}; data-parallel training went out of sync"
        )));
    }
    Ok(())
}

/// Checks before training that every process has the same trainable parameters and data size.
fn check_ranks_agree(
    c: &mut dyn Collective,
    optimizer: &AdamW,
    samples: usize,
    total_steps: i64,
) -> Result<()> {
    let mut signature: u64 = 1469598103934665603;
    for s in &optimizer.states {
        for b in s.name.bytes().chain(format!("{:?}", s.param.size()).bytes()) {
            signature = (signature ^ u64::from(b)).wrapping_mul(1099511628211);
        }
    }
    if !c.all_equal((signature >> 11) as f64)? {
        return Err(Error::invalid(
            "the processes disagree on the model's trainable parameters (shapes or LoRA config); every process \
             must build the same model and adapter",
        ));
    }
    if !c.all_equal(samples as f64)? || !c.all_equal(total_steps as f64)? {
        return Err(Error::invalid(
            "the processes disagree on the dataset size or the number of steps; give every process the same data",
        ));
    }
    Ok(())
}

/// The evaluation loss, each process taking its share of the evaluation set and the means averaged.
fn evaluate_sharded<T: TrainTask + ?Sized>(
    model: &mut T,
    source: &dyn BatchSource,
    config: &TrainConfig,
    collective: Option<&mut (dyn Collective + '_)>,
    cx: &ForwardContext,
) -> Result<f64> {
    let Some(c) = collective else {
        return evaluate(model, source, config.batch_size, cx);
    };
    let shard: Vec<usize> = (config.rank..source.len())
        .step_by(config.world_size.max(1))
        .collect();
    let (sum, count) = evaluate_indices(model, source, &shard, config.batch_size, cx)?;
    let totals = Tensor::f_from_slice(&[sum, count as f64])?;
    c.all_reduce_mean(&totals)?;
    let totals = Vec::<f64>::try_from(totals)?;
    if totals[1] == 0.0 {
        return Err(Error::invalid("the evaluation dataset is empty"));
    }
    Ok(totals[0] / totals[1])
}

/// Mean loss over an evaluation source, without gradients, under `cx` (no dropout: an inference context).
pub fn evaluate<T: TrainTask + ?Sized>(
    model: &T,
    source: &dyn BatchSource,
    batch_size: usize,
    cx: &ForwardContext,
) -> Result<f64> {
    let all: Vec<usize> = (0..source.len()).collect();
    let (sum, batches) = evaluate_indices(model, source, &all, batch_size, cx)?;
    if batches == 0 {
        return Err(Error::invalid("the evaluation dataset is empty"));
    }
    Ok(sum / batches as f64)
}

/// The sum of per-batch mean losses over `indices`, and the number of batches.
fn evaluate_indices<T: TrainTask + ?Sized>(
    model: &T,
    source: &dyn BatchSource,
    indices: &[usize],
    batch_size: usize,
    cx: &ForwardContext,
) -> Result<(f64, usize)> {
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let mut total = Tensor::f_zeros([], (Kind::Double, device))?;
    let mut batches = 0;
    let result = (|| -> Result<()> {
        for idx in indices.chunks(batch_size.max(1)) {
            let b = source.batch(idx)?;
            let pv = model.check_pixel_values(&b.pixel_values, cx)?;
            let image = model.encode_images(&pv, cx)?;
            if let Some(l) = model.loss_over_images(&b, &image, cx)? {
                total = total.f_add(&l.f_to_kind(Kind::Double)?)?;
                batches += 1;
            }
        }
        Ok(())
    })();
    result?;
    Ok((f64::try_from(total)?, batches))
}

/// Loads a checkpoint's weights and optimizer state into the run.
fn resume<T: TrainTask + ?Sized>(
    dir: &std::path::Path,
    model: &mut T,
    optimizer: &mut AdamW,
    format: &WeightsFormat,
) -> Result<TrainerState> {
    if !dir.is_dir() {
        return Err(Error::not_found("checkpoint to resume from", dir));
    }
    load_weights(dir, model, format)?;
    checkpoint::load_state(dir, optimizer)
}

/// The best checkpoint a resumed state records, looked up next to the checkpoint resumed from (the folder
/// may have moved since it was written). With `load_best_model_at_end`, a best step before the resumed one
/// whose checkpoint is gone is an error now rather than a model that cannot be restored at the end.
fn best_checkpoint_after_resume(
    state: &TrainerState,
    resumed: &std::path::Path,
    config: &TrainConfig,
) -> Result<Option<PathBuf>> {
    let Some(step) = state.best_global_step else {
        return Ok(None);
    };
    let here = resumed.parent().map(|p| checkpoint::checkpoint_dir(p, step));
    let found =
        here.filter(|d| d.join(checkpoint::STATE_NAME).is_file() && state.best_model_checkpoint.is_some());
    if found.is_none() && config.load_best_model_at_end && step < state.global_step {
        return Err(Error::checkpoint(format!(
            "load_best_model_at_end needs the best checkpoint (step {step}, {} {:?}) that {} records, and it is \
             not there; resume from a folder that still holds it, or train without load_best_model_at_end",
            config.metric_for_best_model.as_deref().unwrap_or("eval_loss"),
            state.best_metric.unwrap_or(f64::NAN),
            resumed.join(checkpoint::STATE_NAME).display()
        )));
    }
    Ok(found)
}

/// `load_best_model_at_end`: the trained weights of the best evaluation back into the model: from this run's
/// host copies, or from the best checkpoint (a best from before a resume). Nothing when the last step is the
/// best, or when no evaluation ran.
fn load_best<T: TrainTask + ?Sized>(
    model: &mut T,
    optimizer: &AdamW,
    state: &TrainerState,
    best_weights: Option<Vec<Tensor>>,
    format: &WeightsFormat,
) -> Result<()> {
    let Some(step) = state.best_global_step else {
        return Ok(());
    };
    if step == state.global_step {
        return Ok(());
    }
    if let Some(weights) = best_weights {
        let _guard = tch::no_grad_guard();
        for (s, w) in optimizer.states.iter().zip(weights) {
            let mut t = s.param.shallow_clone();
            t.f_copy_(&w.f_to_device(t.device())?)?;
        }
        return Ok(());
    }
    match &state.best_model_checkpoint {
        Some(dir) => load_weights(dir, model, format),
        None => Err(Error::checkpoint(format!(
            "load_best_model_at_end: the best step {step} has no checkpoint to load it from"
        ))),
    }
}

/// A checkpoint's trained weights into the model (an adapter's, or every parameter for full fine-tuning).
fn load_weights<T: TrainTask + ?Sized>(
    dir: &std::path::Path,
    model: &mut T,
    format: &WeightsFormat,
) -> Result<()> {
    match format {
        WeightsFormat::Adapter { name, bias, .. } => {
            let files = crate::weights::SafetensorsFiles::open(&[dir.join("adapter_model.safetensors")])?;
            let mut tensors = std::collections::BTreeMap::new();
            for n in files.names() {
                if let Some(t) = files.read(n)? {
                    tensors.insert(n.clone(), t);
                }
            }
            crate::lora::inject::load_adapter_state(model.lora_host(), name, bias, &tensors)?;
        }
        WeightsFormat::Full => {
            let files = crate::weights::SafetensorsFiles::open_folder(dir)?;
            let _guard = tch::no_grad_guard();
            for (name, t) in model.named_parameters() {
                let src = files.read(&name)?.ok_or_else(|| {
                    Error::checkpoint(format!("tensor `{name}` is missing from {}", dir.display()))
                })?;
                if src.size() != t.size() {
                    return Err(Error::checkpoint(format!(
                        "tensor `{name}` has shape {:?} in the checkpoint but {:?} in the model",
                        src.size(),
                        t.size()
                    )));
                }
                let mut t = t.shallow_clone();
                t.f_copy_(&src.f_to_kind(t.kind())?.f_to_device(t.device())?)?;
            }
        }
    }
    model.load_extra(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_and_reproducible() {
        let a = epoch_order(10, 3, 0, true);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(10, 3, 0, true));
        assert_ne!(a, epoch_order(10, 3, 1, true));
        assert_eq!(epoch_order(4, 3, 0, false), vec![0, 1, 2, 3]);
    }
}

#[cfg(test)]
mod settings_tests {
    use serde_json::json;

    use super::*;
    use crate::train::checkpoint::ResumeFrom;

    #[test]
    fn train_settings_are_read_by_train_s_names_with_defaults_for_the_rest() {
        let c = TrainConfig::from_settings(json!({
            "batch_size": 4, "adam_betas": [0.8, 0.9], "lr_scheduler": "cosine", "mixed_precision": "auto",
            "resume_from_checkpoint": true, "output_dir": "out"
        }))
        .unwrap();
        assert_eq!(
            (c.batch_size, c.betas, c.schedule),
            (4, (0.8, 0.9), Schedule::Cosine)
        );
        assert_eq!(c.precision.on(Device::Cpu), Precision::Float32);
        assert_eq!(c.resume_from, Some(ResumeFrom::Latest));
        assert_eq!((c.epochs, c.learning_rate, c.rank, c.world_size), (1, 1e-4, 0, 1));
        assert!(!crate::config::struct_fields::<TrainConfig>().contains(&"rank"));
    }

    #[test]
    fn bad_train_settings_name_the_argument() {
        let err = |v| TrainConfig::from_settings(v).unwrap_err().to_string();
        assert!(err(json!({"batch_sise": 4})).contains("unsupported keyword argument \"batch_sise\""));
        assert!(err(json!({"batch_size": -1})).contains("batch_size"));
        assert!(err(json!({"batch_size": 0})).contains("batch_size must be at least 1"));
        assert!(err(json!({"lr_scheduler": "exotic"})).contains("lr_scheduler must be"));
        assert!(err(json!({"mixed_precision": "fp8"})).contains("mixed_precision must be"));
        assert!(err(json!({"save_total_limit": 0})).contains("save_total_limit"));
    }
}
