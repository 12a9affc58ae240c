//! Mixed-adapter batches from Rust alone: each image of a `generate` call (greedy and beam search, rows leaving
//! as captions end) and of a forward runs its own adapter, LoRA or DoRA, as it does alone with that adapter
//! active. (tests/test_mixed_adapters.py compares with peft's mixed batch.)

mod common;

use blip_peft::blip::ForwardInputs;
use blip_peft::config::{BlipTextConfig, BlipVisionConfig};
use blip_peft::generate::{generate, generate_with_adapters, GenerationConfig};
use blip_peft::lora::{self, LoraConfig};
use blip_peft::{BlipConfig, BlipForConditionalGeneration};
use common::global_rng;
use tch::{Device, Kind, Tensor};

fn model_with_adapters() -> BlipForConditionalGeneration {
    let text = BlipTextConfig {
        bos_token_id: 97,
        sep_token_id: 3,
        pad_token_id: 0,
        initializer_range: 0.2,
        ..common::tiny_text()
    };
    let vision = BlipVisionConfig {
        initializer_range: 0.02,
        ..common::tiny_vision()
    };
    let config = BlipConfig::new(text, vision).unwrap();
    let mut model = BlipForConditionalGeneration::random(config, 0, Kind::Float, Device::Cpu).unwrap();
    model.training = false;
    tch::manual_seed(5);
    let adapters = [
        (
            "x",
            serde_json::json!({"r": 4, "lora_alpha": 8, "init_lora_weights": false,
            "target_modules": ["query", "value", "qkv", "patch_embedding"]}),
        ),
        (
            "y",
            serde_json::json!({"r": 2, "lora_alpha": 4, "init_lora_weights": false,
            "target_modules": ["key", "fc1", "output.dense"]}),
        ),
        (
            "z",
            serde_json::json!({"r": 4, "lora_alpha": 8, "init_lora_weights": false, "use_dora": true,
            "target_modules": ["query", "qkv", "patch_embedding"]}),
        ),
    ];
    for (name, config) in adapters {
        lora::inject(&mut model, &LoraConfig::from_json(&config).unwrap(), name).unwrap();
    }
    model
}

fn alone(
    model: &mut BlipForConditionalGeneration,
    name: &str,
    f: impl FnOnce(&BlipForConditionalGeneration) -> Tensor,
) -> Tensor {
    if name == "__base__" {
        lora::inject::set_disabled(model, true).unwrap();
    } else {
        lora::inject::set_active(model, name).unwrap();
    }
    let out = f(model);
    lora::inject::set_disabled(model, false).unwrap();
    out
}

#[test]
fn mixed_generate_equals_each_image_alone() {
    let _rng = global_rng();
    let mut model = model_with_adapters();
    let names: Vec<String> = ["x", "__base__", "y", "z", "x", "z"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tch::manual_seed(1);
    let px = Tensor::randn([names.len() as i64, 3, 32, 32], (Kind::Float, Device::Cpu));
    for beams in [1, 3] {
        let config = GenerationConfig {
            max_new_tokens: Some(10),
            num_beams: beams,
            ..Default::default()
        };
        let (got, stats) = generate_with_adapters(&model, &px, None, None, Some(&names), &config).unwrap();
        let mut distinct = std::collections::HashSet::new();
        for (i, name) in names.iter().enumerate() {
            let one = px.narrow(0, i as i64, 1);
            let want = alone(&mut model, name, |m| {
                generate(m, &one, None, None, &config).unwrap()
            });
            let width = want.size()[1];
            let row = got.narrow(0, i as i64, 1).narrow(1, 0, width);
            assert_eq!(
                Vec::<i64>::try_from(row.view([-1])).unwrap(),
                Vec::<i64>::try_from(want.view([-1])).unwrap(),
                "{name} beams {beams}"
            );
            distinct.insert(Vec::<i64>::try_from(want.view([-1])).unwrap());
        }
        assert!(distinct.len() > 2, "the adapters make a difference");
        assert!(!stats.rows_per_step.is_empty());
    }
}

#[test]
fn mixed_forward_equals_each_row_alone_and_checks_names() {
    let _rng = global_rng();
    let mut model = model_with_adapters();
    let names: Vec<String> = ["z", "y", "__base__", "x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tch::manual_seed(2);
    let px = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(4, 90, [4, 6], (Kind::Int64, Device::Cpu));
    let inputs = ForwardInputs {
        pixel_values: &px,
        input_ids: &ids,
        attention_mask: None,
        labels: None,
    };
    let got = tch::no_grad(|| lora::mixed::forward(&model, &inputs, &names).unwrap().logits);
    for (i, name) in names.iter().enumerate() {
        let (p, t) = (px.narrow(0, i as i64, 1), ids.narrow(0, i as i64, 1));
        let want = alone(&mut model, name, |m| {
            tch::no_grad(|| {
                m.forward(&ForwardInputs {
                    pixel_values: &p,
                    input_ids: &t,
                    attention_mask: None,
                    labels: None,
                })
                .unwrap()
                .logits
            })
        });
        let diff = f64::try_from((got.narrow(0, i as i64, 1) - &want).abs().max()).unwrap();
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    let bad: Vec<String> = vec!["x".into(), "nope".into(), "y".into(), "x".into()];
    let err = lora::mixed::forward(&model, &inputs, &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not hold: nope"), "{err}");
    let err = lora::mixed::forward(&model, &inputs, &names[..3])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("has 3 names but the batch has 4"), "{err}");
}
