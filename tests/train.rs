//! The training loop's checkpoints from Rust alone: a run stopped at a checkpoint and resumed from it ends
//! with the uninterrupted run's losses and adapter, and a half-written checkpoint is never resumed from.

mod common;

use blip_peft::data::TensorDataset;
use blip_peft::lora::{inject, LoraConfig};
use blip_peft::train::checkpoint::{ResumeFrom, WeightsFormat};
use blip_peft::train::trainer::{Control, Observer, StepLog, TrainConfig};
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
        _metrics: &blip_peft::train::trainer::Metrics,
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
