//! The retrieval head from Rust alone (transformers parity is tests/test_retrieval.py's): transformers' names,
//! the two scores' shapes and ranges, a save / load round trip, the losses' invariants, LoRA through the shared
//! `LoraHost` operations.

mod common;

use blip_peft::blip::retrieval::{BlipForImageTextRetrieval, TEMP_MAX};
use blip_peft::blip::Record;
use blip_peft::nn::ForwardContext;
use tch::{Device, Kind, Tensor};

fn tiny() -> BlipForImageTextRetrieval {
    let _rng = common::global_rng();
    let mut config = common::tiny_config();
    config.set_raw_field("image_text_hidden_size", serde_json::json!(16));
    BlipForImageTextRetrieval::random(config, 0, Kind::Float, Device::Cpu).unwrap()
}

fn inputs(images: i64, texts: i64) -> (Tensor, Tensor, Tensor) {
    let _rng = common::global_rng();
    tch::manual_seed(1);
    let px = Tensor::randn([images, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(4, 90, [texts, 6], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([texts, 6], (Kind::Int64, Device::Cpu));
    (px, ids, mask)
}

#[test]
fn names_are_transformers_state_dict_keys() {
    let model = tiny();
    let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[0], "vision_model.embeddings.class_embedding");
    assert!(names.contains(&"text_encoder.encoder.layer.1.crossattention.self.query.weight".to_string()));
    let tail: Vec<&str> = names[names.len() - 6..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "vision_proj.weight",
            "vision_proj.bias",
            "text_proj.weight",
            "text_proj.bias",
            "itm_head.weight",
            "itm_head.bias"
        ]
    );
}

#[test]
fn scores_have_transformers_shapes_and_cosines_are_bounded() {
    let model = tiny();
    let (px, ids, mask) = inputs(3, 2);
    let cx = ForwardContext::INFERENCE;
    let itc = model
        .forward(&px, &ids, Some(&mask), false, Record::default(), &cx)
        .unwrap();
    assert_eq!(itc.itm_score.size(), [3, 2]);
    assert!(f64::try_from(itc.itm_score.abs().max()).unwrap() <= 1.0 + 1e-6);
    assert_eq!(itc.question_embeds.size(), [2, 6, 32]);
    assert!(model
        .forward(&px, &ids, Some(&mask), true, Record::default(), &cx)
        .is_err());
    let (px, ids, mask) = inputs(2, 2);
    let itm = model
        .forward(&px, &ids, Some(&mask), true, Record::default(), &cx)
        .unwrap();
    assert_eq!(itm.itm_score.size(), [2, 2]);
}

#[test]
fn save_and_load_round_trip() {
    let model = tiny();
    let dir = std::env::temp_dir().join(format!("blip_retrieval_rt_{}", std::process::id()));
    model.save_pretrained(&dir).unwrap();
    let again = BlipForImageTextRetrieval::from_pretrained_with(&dir, None, None, Device::Cpu).unwrap();
    for ((n, a), (m, b)) in model.named_parameters().iter().zip(again.named_parameters()) {
        assert_eq!(n, &m);
        assert!(a.equal(&b), "{n}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BlipForImageTextRetrieval");
    assert_eq!(config["image_text_hidden_size"], 16);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn losses_clamp_the_temperature_and_never_draw_a_positive() {
    let model = tiny();
    let (px, ids, mask) = inputs(4, 4);
    let temp = Tensor::from(2.0f32).set_requires_grad(true);
    let image_ids = Tensor::from_slice(&[0i64, 1, 0, 2]);
    let out = {
        let _rng = common::global_rng();
        model
            .losses(
                &px,
                &ids,
                Some(&mask),
                Some(&image_ids),
                &temp,
                Some(3),
                &ForwardContext::INFERENCE,
            )
            .unwrap()
    };
    assert!((f64::try_from(&temp).unwrap() - TEMP_MAX).abs() < 1e-7);
    let negatives: Vec<i64> = Vec::try_from(&out.negative_images).unwrap();
    let ids_of: [i64; 4] = [0, 1, 0, 2];
    for (text, image) in negatives.iter().enumerate() {
        assert_ne!(
            ids_of[text], ids_of[*image as usize],
            "text {text} drew its own image"
        );
    }
    let total = out.itc.shallow_clone() + out.itm.shallow_clone();
    total.backward();
    assert!(temp.grad().defined());
    assert!(f64::try_from(out.itc).unwrap() > 0.0 && f64::try_from(out.itm).unwrap() > 0.0);
}

#[test]
fn lora_targets_include_the_text_encoder() {
    let mut model = tiny();
    let targets = blip_peft::lora::inject::targetable_layers(&mut model).unwrap();
    assert!(targets
        .iter()
        .any(|t| t.path == "text_encoder.encoder.layer.0.attention.self.query"));
    let config = blip_peft::lora::LoraConfig::from_json(
        &serde_json::json!({"r": 2, "target_modules": ["query", "itm_head"]}),
    )
    .unwrap();
    let injected = blip_peft::lora::inject(&mut model, &config, "default").unwrap();
    assert!(injected.contains(&"itm_head".to_string()));
    assert_eq!(
        blip_peft::lora::inject::adapter_names(&mut model).unwrap(),
        ["default"]
    );
}
