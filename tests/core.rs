//! Core tests on a tiny random model, without Python.

use blip_peft::config::{BlipTextConfig, BlipVisionConfig};
use blip_peft::{BlipConfig, BlipForConditionalGeneration};
use tch::{Device, Kind, Tensor};

fn tiny_config() -> BlipConfig {
    let text = BlipTextConfig {
        vocab_size: 99,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 40,
        bos_token_id: 97,
        sep_token_id: 3,
        ..Default::default()
    };
    let vision = BlipVisionConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        image_size: 32,
        patch_size: 8,
        ..Default::default()
    };
    BlipConfig::new(text, vision).unwrap()
}

#[test]
fn forward_shapes_and_loss() {
    let model = BlipForConditionalGeneration::random(tiny_config(), 0, Kind::Float, Device::Cpu).unwrap();
    let pixels = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[97i64, 5, 6, 3, 97, 7, 3, 0]).view([2, 4]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 0]).view([2, 4]);
    let out = model
        .forward(&blip_peft::blip::ForwardInputs {
            pixel_values: &pixels,
            input_ids: &ids,
            attention_mask: Some(&mask),
            labels: Some(&ids),
        })
        .unwrap();
    assert_eq!(out.logits.size(), [2, 4, 99]);
    let loss = f64::try_from(out.loss.unwrap()).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
}

#[test]
fn save_and_reload_gives_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = BlipForConditionalGeneration::random(tiny_config(), 1, Kind::Float, Device::Cpu).unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let again = BlipForConditionalGeneration::from_pretrained(dir.path(), None, Device::Cpu).unwrap();
    let pixels = Tensor::randn([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[97i64, 5, 6]).view([1, 3]);
    let run = |m: &BlipForConditionalGeneration| {
        m.forward(&blip_peft::blip::ForwardInputs {
            pixel_values: &pixels,
            input_ids: &ids,
            attention_mask: None,
            labels: None,
        })
        .unwrap()
        .logits
    };
    let diff = f64::try_from((run(&model) - run(&again)).abs().max()).unwrap();
    assert_eq!(diff, 0.0);
    assert_eq!(model.named_parameters().len(), again.named_parameters().len());
}

#[test]
fn bad_inputs_are_errors() {
    let model = BlipForConditionalGeneration::random(tiny_config(), 0, Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[97i64, 5]).view([1, 2]);
    let wrong = Tensor::randn([1, 3, 16, 16], (Kind::Float, Device::Cpu));
    let err = model
        .forward(&blip_peft::blip::ForwardInputs {
            pixel_values: &wrong,
            input_ids: &ids,
            attention_mask: None,
            labels: None,
        })
        .err()
        .unwrap();
    assert!(err.to_string().contains("pixel_values"), "{err}");
    let pixels = Tensor::randn([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let out_of_vocab = Tensor::from_slice(&[97i64, 500]).view([1, 2]);
    let err = model
        .forward(&blip_peft::blip::ForwardInputs {
            pixel_values: &pixels,
            input_ids: &out_of_vocab,
            attention_mask: None,
            labels: None,
        })
        .err()
        .unwrap();
    assert!(err.to_string().contains("input_ids"), "{err}");
    let missing = tempfile::tempdir().unwrap();
    let err = BlipForConditionalGeneration::from_pretrained(&missing.path().join("nope"), None, Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, blip_peft::Error::NotFound { .. }));
}
