//! The training loop's checkpoints from Rust alone: a run stopped at a checkpoint and resumed from it ends
//! with the uninterrupted run's losses and adapter, and a half-written checkpoint is never resumed from.

mod common;

use blip_peft::data::TensorDataset;
use blip_peft::lora::{inject, LoraConfig};
use blip_peft::train::checkpoint::{ResumeFrom, WeightsFormat};
use blip_peft::train::trainer::{Control, Metrics, Observer, StepLog, TrainConfig};
use blip_peft::train::Trainer;
use blip_peft::BlipForConditionalGeneration;
use common::{global_rng, tiny_config};
use tch::{Device, Kind, Tensor};

/// Stops the run after `stop_at` optimizer steps (None: never).
struct StopAt(Option<i64>);

impl Observer for StopAt {
    fn on_log(
        &mut self,
        _model: &blip_peft::blip::BlipForConditionalGeneration,
        logs: &[StepLog],
        _total_steps: i64,
    ) -> blip_peft::Result<Control> {
        let last = logs.last().map_or(0, |l| l.step);
        Ok(if self.0.is_some_and(|s| last >= s) {
            Control::Stop
        } else {
            Control::Continue
        })
    }

    fn on_eval(
        &mut self,
        _model: &blip_peft::blip::BlipForConditionalGeneration,
        _step: i64,
        _metrics: &Metrics,
    ) -> blip_peft::Result<Control> {
        Ok(Control::Continue)
    }
}

fn data() -> TensorDataset {
    tch::manual_seed(5);
    let pixels = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(4, 90, [8, 6], (Kind::Int64, Device::Cpu));
    TensorDataset::new(pixels, ids, None, None, 97).unwrap()
}

/// The tiny model with a fresh LoRA adapter drawn under `adapter_seed`.
fn adapted_model(adapter_seed: i64) -> BlipForConditionalGeneration {
    let mut model = BlipForConditionalGeneration::random(tiny_config(), 1, Kind::Float, Device::Cpu).unwrap();
    tch::manual_seed(adapter_seed);
    let config = LoraConfig::from_json(&serde_json::json!({
        "r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "qkv"], "init_lora_weights": false
    }))
    .unwrap();
    inject(&mut model, &config, "default").unwrap();
    blip_peft::lora::inject::mark_trainable(&mut model, "default", "none").unwrap();
    model
}

fn run(
    output_dir: &std::path::Path,
    stop_at: Option<i64>,
    resume: bool,
) -> (Vec<f64>, Vec<(String, Tensor)>) {
    // A resumed run starts from another fresh adapter: resuming must replace it with the checkpoint's.
    let mut model = adapted_model(if resume { 11 } else { 10 });
    let mut config = TrainConfig::from_settings(serde_json::json!({
        "max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 2,
        "mixed_precision": "no", "seed": 3, "output_dir": output_dir,
    }))
    .unwrap();
    if resume {
        config.resume_from = Some(ResumeFrom::Latest);
    }
    let format = WeightsFormat::Adapter {
        name: "default",
        bias: "none",
        config_json: "{}",
    };
    let outcome = Trainer::run(
        &mut model,
        Box::new(data()),
        None,
        &config,
        &format,
        &mut StopAt(stop_at),
        None,
    )
    .unwrap();
    let losses = outcome.history.iter().map(|l| l.loss).collect();
    let adapter = model
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| n.contains("lora_"))
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    (losses, adapter)
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_one() {
    let _rng = global_rng();
    let whole = tempfile::tempdir().unwrap();
    let (full_losses, full_adapter) = run(whole.path(), None, false);
    assert_eq!(full_losses.len(), 6);

    let parts = tempfile::tempdir().unwrap();
    let (first, _) = run(parts.path(), Some(4), false);
    assert_eq!(first.len(), 4);
    // A half-written checkpoint (no trainer_state.json) from a later step must not be picked.
    std::fs::create_dir_all(parts.path().join("checkpoint-6")).unwrap();
    let (rest, resumed_adapter) = run(parts.path(), None, true);
    assert_eq!(rest.len(), 6); // the history carries on from checkpoint-4's
    assert_eq!(rest[..4], first[..]);
    for (got, want) in rest.iter().zip(&full_losses).skip(4) {
        assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
    }
    for ((n, a), (m, b)) in resumed_adapter.iter().zip(&full_adapter) {
        assert_eq!(n, m);
        let diff = f64::try_from((a - b).abs().max()).unwrap();
        assert!(diff <= 1e-5, "{n}: {diff}");
    }
}

/// Reports a scripted "CIDEr" at each evaluation step, as the bindings' caption scorer would.
struct Scripted(Vec<(i64, f64)>);

impl Observer for Scripted {
    fn on_log(
        &mut self,
        _model: &blip_peft::blip::BlipForConditionalGeneration,
        _logs: &[StepLog],
        _total_steps: i64,
    ) -> blip_peft::Result<Control> {
        Ok(Control::Continue)
    }

    fn on_eval(
        &mut self,
        _model: &blip_peft::blip::BlipForConditionalGeneration,
        step: i64,
        metrics: &Metrics,
    ) -> blip_peft::Result<Control> {
        assert_eq!(metrics.names(), ["eval_loss", "CIDEr"], "step {step}");
        Ok(Control::Continue)
    }

    fn score(
        &mut self,
        _model: &blip_peft::blip::BlipForConditionalGeneration,
        step: i64,
    ) -> blip_peft::Result<Option<Metrics>> {
        let value = self.0.iter().find(|(s, _)| *s == step).map(|(_, v)| *v).unwrap();
        Ok(Some(Metrics(vec![("CIDEr".into(), value)])))
    }
}

fn adapter_of(model: &BlipForConditionalGeneration) -> Vec<(String, Tensor)> {
    model
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| n.contains("lora_"))
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

#[test]
fn the_best_step_is_tracked_kept_and_loaded_at_the_end() {
    let _rng = global_rng();
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig::from_settings(serde_json::json!({
        "max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "eval_steps": 2, "save_steps": 2,
        "save_total_limit": 1, "mixed_precision": "no", "seed": 3, "output_dir": out.path(),
        "metric_for_best_model": "eval_CIDEr", "load_best_model_at_end": true,
    }))
    .unwrap();
    assert_eq!(config.best_metric(), Some(("CIDEr".to_string(), true)));
    let format = WeightsFormat::Adapter {
        name: "default",
        bias: "none",
        config_json: "{}",
    };
    let mut model = adapted_model(10);
    // an equal later value does not replace the best (strict comparison, as transformers compares)
    let mut scores = Scripted(vec![(2, 0.5), (4, 0.9), (6, 0.9)]);
    let outcome = Trainer::run(
        &mut model,
        Box::new(data()),
        Some(Box::new(data())),
        &config,
        &format,
        &mut scores,
        None,
    )
    .unwrap();
    assert_eq!(
        (outcome.best_global_step, outcome.best_metric),
        (Some(4), Some(0.9))
    );
    let best_dir = out.path().join("checkpoint-4");
    assert_eq!(outcome.best_model_checkpoint.as_deref(), Some(best_dir.as_path()));
    assert_eq!(
        outcome.metric_history.iter().map(|r| r.step).collect::<Vec<_>>(),
        [2, 4, 6]
    );
    // save_total_limit=1 keeps the newest checkpoint and the best one
    let mut left: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    left.sort();
    assert_eq!(left, ["checkpoint-4", "checkpoint-6"]);
    // the model ends with checkpoint-4's adapter, not the last step's
    let mut reference = adapted_model(10);
    let files =
        blip_peft::weights::SafetensorsFiles::open(&[best_dir.join("adapter_model.safetensors")]).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    for n in files.names() {
        tensors.insert(n.clone(), files.read(n).unwrap().unwrap());
    }
    inject::load_adapter_state(&mut reference, "default", "none", &tensors).unwrap();
    let (got, want) = (adapter_of(&model), adapter_of(&reference));
    assert_eq!(got.len(), want.len());
    for ((n, a), (_, b)) in got.iter().zip(&want) {
        assert!(a.equal(b), "{n}");
    }
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("checkpoint-6/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["best_metric"], 0.9);
    assert_eq!(state["best_global_step"], 4);
    assert_eq!(state["metric_history"][1]["metrics"]["CIDEr"], 0.9);
}

#[test]
fn best_model_settings_without_an_eval_set_are_refused() {
    let _rng = global_rng();
    let config =
        TrainConfig::from_settings(serde_json::json!({"max_steps": 1, "load_best_model_at_end": true}))
            .unwrap();
    assert_eq!(config.best_metric(), Some(("eval_loss".to_string(), false)));
    let err = Trainer::run(
        &mut adapted_model(1),
        Box::new(data()),
        None,
        &config,
        &WeightsFormat::Full,
        &mut StopAt(None),
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("load_best_model_at_end=True picks the best step by evaluating"),
        "{err}"
    );
    let bad = TrainConfig::from_settings(serde_json::json!({"metric_for_best_model": "eval_"})).unwrap_err();
    assert!(
        bad.to_string()
            .contains("metric_for_best_model must name a metric"),
        "{bad}"
    );
}

/// The frozen vision tower's feature cache: with LoRA on the decoder only (dropout in the decoder and its
/// adapters, so torch's RNG must be left as the skipped tower leaves it), 3 epochs of 10 examples reshuffled
/// into batches of 4, 4 and 2 give the uncached run's losses bit for bit, from the cache in epochs 2 and 3;
/// an adapter on the vision tower makes the run go uncached, saying why.
#[test]
fn the_feature_cache_repeats_the_uncached_run_exactly() {
    let _rng = global_rng();
    let run = |cache: bool, targets: &[&str]| {
        let mut text = common::tiny_text();
        text.hidden_dropout_prob = 0.1;
        // Head size 16 (torch's CPU attention at the tiny head size 8 is not batch-invariant; see
        // tests/test_feature_cache.py).
        let vision = blip_peft::config::BlipVisionConfig {
            initializer_range: 0.02,
            num_attention_heads: 2,
            ..common::tiny_vision()
        };
        let config = blip_peft::BlipConfig::new(text, vision).unwrap();
        let mut model = BlipForConditionalGeneration::random(config, 1, Kind::Float, Device::Cpu).unwrap();
        tch::manual_seed(12);
        let lora = LoraConfig::from_json(&serde_json::json!({
            "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": targets, "init_lora_weights": false
        }))
        .unwrap();
        inject(&mut model, &lora, "default").unwrap();
        blip_peft::lora::inject::mark_trainable(&mut model, "default", "none").unwrap();
        tch::manual_seed(5);
        let pixels = Tensor::randn([10, 3, 32, 32], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint_low(4, 90, [10, 6], (Kind::Int64, Device::Cpu));
        let data = TensorDataset::new(pixels, ids, None, None, 97).unwrap();
        let config = TrainConfig::from_settings(serde_json::json!({
            "epochs": 3, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "mixed_precision": "no",
            "seed": 3, "feature_cache": cache,
        }))
        .unwrap();
        let format = WeightsFormat::Adapter {
            name: "default",
            bias: "none",
            config_json: "{}",
        };
        let outcome = Trainer::run(
            &mut model,
            Box::new(data),
            None,
            &config,
            &format,
            &mut StopAt(None),
            None,
        )
        .unwrap();
        let losses: Vec<f64> = outcome.history.iter().map(|l| l.loss).collect();
        (losses, outcome.feature_cache)
    };
    let (cached, report) = run(true, &["query", "value"]);
    let (plain, off) = run(false, &["query", "value"]);
    assert_eq!(cached.len(), 9);
    assert_eq!(cached, plain);
    assert!(report.enabled);
    assert_eq!((report.misses, report.hits, report.cached_examples), (10, 20, 10));
    assert!(!off.enabled && off.reason.unwrap().contains("feature_cache=False"));
    let (_, vision) = run(true, &["query", "qkv"]);
    assert!(
        !vision.enabled
            && vision
                .reason
                .unwrap()
                .contains("vision tower has trainable parameters")
    );
}
