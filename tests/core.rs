//! Core tests on a tiny random model, without Python.

mod common;

use blip_peft::BlipForConditionalGeneration;
use common::{global_rng, tiny_config};
use tch::{Device, Kind, Tensor};

#[test]
fn forward_shapes_and_loss() {
    let _rng = global_rng();
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
    let _rng = global_rng();
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
    let _rng = global_rng();
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
    let _rng = global_rng();
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

/// The small trained model bundled with the Python package: its captions end at different lengths.
fn bundled_model() -> BlipForConditionalGeneration {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/blip_peft/models/blip-shapes-base");
    BlipForConditionalGeneration::from_pretrained(&dir, Some(Kind::Float), Device::Cpu).unwrap()
}

fn noise(batch: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([batch, 3, 128, 128], (Kind::Float, Device::Cpu))
}

fn run(
    model: &BlipForConditionalGeneration,
    pixels: &Tensor,
    config: &blip_peft::generate::GenerationConfig,
) -> (Tensor, Vec<i64>) {
    let (ids, stats) = blip_peft::generate::generate_with_stats(model, pixels, None, None, config).unwrap();
    (ids, stats.rows_per_step)
}

/// Where each output row's caption ends (its first [SEP]), or -1.
fn caption_ends(ids: &Tensor) -> Vec<i64> {
    (0..ids.size()[0])
        .map(|r| {
            let row = Vec::<i64>::try_from(ids.get(r)).unwrap();
            row.iter().position(|&t| t == 3).map_or(-1, |p| p as i64)
        })
        .collect()
}

/// The rows per decoder pass start at the whole batch, never grow, and fall before the last pass.
fn assert_rows_shrink(rows: &[i64], all: i64) {
    assert_eq!(rows[0], all, "{rows:?}");
    assert!(rows.windows(2).all(|w| w[1] <= w[0]), "{rows:?}");
    assert!(
        *rows.last().unwrap() < all,
        "finished rows still computed: {rows:?}"
    );
}

#[test]
fn finished_captions_stop_costing_compute() {
    let _rng = global_rng();
    use blip_peft::generate::{EarlyStopping, GenerationConfig};
    let model = bundled_model();
    let pixels = noise(8, 1);
    let ends_differ = |ids: &Tensor| {
        let mut ends = caption_ends(ids);
        ends.sort();
        ends.dedup();
        assert!(ends.len() > 1, "every caption ends at the same step: {ends:?}");
    };
    // Greedy and beam search: each image's tokens equal its own decoding alone, although the batch shrank
    // around it (its image keys/values and cache rows moved).
    for (beams, early_stopping) in [
        (1, EarlyStopping::False),
        (3, EarlyStopping::False),
        (3, EarlyStopping::True),
        (4, EarlyStopping::Never),
    ] {
        let config = GenerationConfig {
            num_beams: beams,
            early_stopping,
            max_new_tokens: Some(25),
            ..Default::default()
        };
        let (ids, rows) = run(&model, &pixels, &config);
        ends_differ(&ids);
        assert_rows_shrink(&rows, 8 * beams);
        assert!(rows.iter().all(|r| r % beams == 0), "{rows:?}");
        // The width is the longest caption's, over the images that settled early too.
        let fill = if beams > 1 { 3 } else { 0 };
        for i in 0..8 {
            let (alone, _) = run(&model, &pixels.narrow(0, i, 1), &config);
            let n = alone.size()[1];
            assert_eq!(
                ids.get(i).narrow(0, 0, n),
                alone.get(0),
                "image {i}, {beams} beams"
            );
            assert!(
                bool::try_from(ids.get(i).narrow(0, n, ids.size()[1] - n).eq(fill).all()).unwrap(),
                "image {i}"
            );
        }
    }
    // Sampling several captions per image: rows leave one by one, images keep different numbers of rows
    // (their image keys/values shared through the padded layout), and a seed gives the same captions.
    let config = GenerationConfig {
        do_sample: true,
        num_return_sequences: 3,
        temperature: 1.5,
        max_new_tokens: Some(25),
        seed: Some(1),
        ..Default::default()
    };
    let (ids, rows) = run(&model, &pixels, &config);
    ends_differ(&ids);
    assert_rows_shrink(&rows, 24);
    assert!(rows.iter().any(|r| r % 3 != 0), "{rows:?}");
    let (again, rows_again) = run(&model, &pixels, &config);
    assert!(ids.equal(&again));
    assert_eq!(rows, rows_again);
}

/// Records every parameter the model asks for while it is built.
struct Recording {
    inner: blip_peft::nn::RandomInit,
    asked: Vec<String>,
}

impl blip_peft::nn::ParamSource for Recording {
    fn param(
        &mut self,
        name: &str,
        shape: &[i64],
        init: blip_peft::nn::Init,
        kind: Kind,
    ) -> blip_peft::Result<Tensor> {
        self.asked.push(name.to_string());
        self.inner.param(name, shape, init, kind)
    }

    fn kind(&self) -> Kind {
        self.inner.kind()
    }
}

/// The children each module declares once (`module!`) drive every walk: the loader asks for exactly the
/// parameters the walk lists (the loader names them too, as candle's `vb.pp` does; this keeps both in step),
/// the mutable walk visits the same parameters as the immutable one, adapters included, and every LoRA
/// target is a module of the printed tree.
#[test]
fn loading_and_every_walk_agree_on_the_tree() {
    let _rng = global_rng();
    let mut src = Recording {
        inner: blip_peft::nn::RandomInit::new(0, Kind::Float, Device::Cpu),
        asked: Vec::new(),
    };
    let mut model = BlipForConditionalGeneration::build(tiny_config(), &mut src).unwrap();
    let walked: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
    let mut asked = src.asked.clone();
    asked.sort();
    let mut sorted = walked.clone();
    sorted.sort();
    assert_eq!(
        asked, sorted,
        "the loader and the parameter walk name different parameters"
    );

    use blip_peft::lora::{inject, LoraConfig};
    let config = LoraConfig::from_json(&serde_json::json!({
        "r": 2, "target_modules": ["qkv", "query", "patch_embedding", "decoder"], "use_dora": true
    }))
    .unwrap();
    inject(&mut model, &config, "default").unwrap();
    let immutable: Vec<String> = model
        .plain_named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut mutable = Vec::new();
    model.visit_params_mut(&mut |name, _| mutable.push(name.to_string()));
    assert_eq!(immutable, mutable);
    assert!(mutable.iter().any(|n| n.ends_with("qkv.lora_A.default.weight")));
    assert!(mutable
        .iter()
        .any(|n| n.ends_with("lora_magnitude_vector.default.weight")));

    let printed = blip_peft::lora::saved::module_paths(&model);
    let targets = blip_peft::lora::inject::targetable_layers(&mut model).unwrap();
    assert_eq!(targets.len(), 1 + 2 * 4 + 2 * (4 + 4 + 2) + 2); // patch conv, vision 4/layer, text 10/layer, head 2
    for t in &targets {
        assert!(printed.contains(&t.path), "{} is not in the printed tree", t.path);
    }
}

#[test]
fn recording_forward_returns_vision_hidden_states_and_attentions() {
    use blip_peft::blip::{ForwardInputs, ForwardOptions, Record};
    use blip_peft::nn::ForwardContext;
    let _rng = global_rng();
    let model = BlipForConditionalGeneration::random(tiny_config(), 2, Kind::Float, Device::Cpu).unwrap();
    let pixels = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[97i64, 5, 6, 3, 97, 7, 3, 0]).view([2, 4]);
    let inputs = ForwardInputs {
        pixel_values: &pixels,
        input_ids: &ids,
        attention_mask: None,
        labels: Some(&ids),
    };
    let cx = ForwardContext::mode(false);
    let plain = model.forward(&inputs).unwrap();
    let record = Record {
        hidden_states: true,
        attentions: true,
        eager: false,
    };
    let options = ForwardOptions {
        record,
        ..Default::default()
    };
    let out = model.forward_options(&inputs, &cx, &options).unwrap();
    // embeddings' output + one per layer; one attention map per layer, rows summing to 1
    assert_eq!(out.recorded.hidden_states.len(), 3);
    assert_eq!(out.recorded.attentions.len(), 2);
    assert_eq!(out.recorded.attentions[0].size(), [2, 4, 17, 17]);
    let rows = out.recorded.attentions[1].sum_dim_intlist(-1, false, Kind::Float);
    assert!(f64::try_from((rows - 1.0).abs().max()).unwrap() < 1e-5);
    // the eager path computes what SDPA computes
    let diff = f64::try_from((&out.logits - &plain.logits).abs().max()).unwrap();
    assert!(diff < 1e-5, "{diff}");
    let loss = |o: &blip_peft::blip::BlipOutput| f64::try_from(o.loss.as_ref().unwrap()).unwrap();
    assert!((loss(&out) - loss(&plain)).abs() < 1e-6);
    // logits of the last position only
    let last = ForwardOptions {
        logits_to_keep: 1,
        ..Default::default()
    };
    let no_labels = ForwardInputs {
        pixel_values: &pixels,
        input_ids: &ids,
        attention_mask: None,
        labels: None,
    };
    let kept = model.forward_options(&no_labels, &cx, &last).unwrap();
    assert_eq!(kept.logits.size(), [2, 1, 99]);
    let tail = plain.logits.narrow(1, 3, 1);
    assert!(f64::try_from((kept.logits - tail).abs().max()).unwrap() < 1e-5);
    assert!(model.forward_options(&inputs, &cx, &last).is_err()); // labels need every position
}
