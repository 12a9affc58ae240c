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

fn logits(model: &BlipForConditionalGeneration, pixels: &Tensor, ids: &Tensor) -> Tensor {
    model
        .forward(&blip_peft::blip::ForwardInputs {
            pixel_values: pixels,
            input_ids: ids,
            attention_mask: None,
            labels: None,
        })
        .unwrap()
        .logits
}

#[test]
fn lora_inject_merge_unload() {
    use blip_peft::lora::{inject, LoraConfig};
    let mut model = BlipForConditionalGeneration::random(tiny_config(), 2, Kind::Float, Device::Cpu).unwrap();
    let pixels = Tensor::randn([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[97i64, 5, 6]).view([1, 3]);
    let plain = logits(&model, &pixels, &ids);
    let config = LoraConfig::from_json(&serde_json::json!({
        "r": 2, "lora_alpha": 4, "target_modules": ["query", "patch_embedding"], "init_lora_weights": false
    }))
    .unwrap();
    let targeted = inject(&mut model, &config, "default").unwrap();
    assert_eq!(targeted.len(), 2 * 2 + 1); // self + cross query in 2 layers, and the patch conv
    let adapted = logits(&model, &pixels, &ids);
    let max_abs = |t: Tensor| f64::try_from(t.abs().max()).unwrap();
    assert!(max_abs(&adapted - &plain) > 1e-4);
    blip_peft::lora::inject::merge(&mut model).unwrap();
    assert!(max_abs(logits(&model, &pixels, &ids) - &adapted) < 1e-4);
    blip_peft::lora::inject::unload(&mut model, false).unwrap();
    assert!(max_abs(logits(&model, &pixels, &ids) - &plain) < 1e-4);
    assert!(model.named_parameters().iter().all(|(n, _)| !n.contains("lora")));
}

#[test]
fn lora_matching_follows_peft() {
    use blip_peft::lora::inject::is_targeted;
    use blip_peft::lora::LoraConfig;
    let list =
        LoraConfig::from_json(&serde_json::json!({"target_modules": ["attention.self.query"]})).unwrap();
    assert!(is_targeted(
        &list,
        "text_decoder.bert.encoder.layer.0.attention.self.query",
        true
    ));
    assert!(!is_targeted(
        &list,
        "text_decoder.bert.encoder.layer.0.crossattention.self.query",
        true
    ));
    let layers =
        LoraConfig::from_json(&serde_json::json!({"target_modules": ["qkv"], "layers_to_transform": [1]}))
            .unwrap();
    assert!(is_targeted(
        &layers,
        "vision_model.encoder.layers.1.self_attn.qkv",
        true
    ));
    assert!(!is_targeted(
        &layers,
        "vision_model.encoder.layers.0.self_attn.qkv",
        true
    ));
    let regex = LoraConfig::from_json(&serde_json::json!({"target_modules": ".*fc[12]"})).unwrap();
    assert!(is_targeted(&regex, "vision_model.encoder.layers.0.mlp.fc2", true));
    assert!(!is_targeted(
        &regex,
        "vision_model.encoder.layers.0.mlp.fc2.x",
        true
    ));
    let all = LoraConfig::from_json(
        &serde_json::json!({"target_modules": "all-linear", "exclude_modules": ["decoder"]}),
    )
    .unwrap();
    assert!(is_targeted(&all, "vision_model.encoder.layers.0.mlp.fc2", true));
    assert!(!is_targeted(
        &all,
        "vision_model.embeddings.patch_embedding",
        false
    ));
    assert!(!is_targeted(&all, "text_decoder.cls.predictions.decoder", true));
}
