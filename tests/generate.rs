//! Generation's bookkeeping on a tiny random model, without Python or transformers: greedy tokens are the
//! argmax of the model's own forward logits, beam search returns its hypotheses best first, each image gets
//! its `num_return_sequences` rows, finished rows are padded, the length settings hold and a seed repeats its
//! draws. (tests/test_generate.py compares the token ids themselves with transformers.)

mod common;

use blip_peft::config::{BlipTextConfig, BlipVisionConfig};
use blip_peft::generate::{generate, EarlyStopping, GenerationConfig};
use blip_peft::{BlipConfig, BlipForConditionalGeneration};
use common::global_rng;
use tch::{Device, Kind, Tensor};

const BOS: i64 = 97;
const SEP: i64 = 3;
const PAD: i64 = 0;

fn tiny_model() -> BlipForConditionalGeneration {
    let text = BlipTextConfig {
        bos_token_id: BOS,
        sep_token_id: SEP,
        pad_token_id: PAD,
        // Weights large enough that captions differ between images and end at different steps.
        initializer_range: 0.2,
        ..common::tiny_text()
    };
    let vision = BlipVisionConfig {
        // transformers' default (1e-10) leaves the images invisible below float32 rounding.
        initializer_range: 0.02,
        ..common::tiny_vision()
    };
    let config = BlipConfig::new(text, vision).unwrap();
    let mut model = BlipForConditionalGeneration::random(config, 0, Kind::Float, Device::Cpu).unwrap();
    model.training = false;
    model
}

fn pixels(batch: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([batch, 3, 32, 32], (Kind::Float, Device::Cpu))
}

fn gen(model: &BlipForConditionalGeneration, pixels: &Tensor, config: &GenerationConfig) -> Tensor {
    generate(model, pixels, None, None, config).unwrap()
}

fn rows(ids: &Tensor) -> Vec<Vec<i64>> {
    (0..ids.size()[0])
        .map(|r| Vec::<i64>::try_from(ids.get(r)).unwrap())
        .collect()
}

/// The number of tokens a row generated after its prompt of `prompt` tokens: up to its first `eos`, included.
fn generated(row: &[i64], prompt: usize, eos: i64) -> usize {
    row[prompt..]
        .iter()
        .position(|&t| t == eos)
        .map_or(row.len() - prompt, |p| p + 1)
}

/// Log-softmax of the model's forward logits at every position of `ids` `[R, L]`: `[R, L, V]`.
fn forward_log_probs(model: &BlipForConditionalGeneration, pixels: &Tensor, ids: &Tensor) -> Tensor {
    let _guard = tch::no_grad_guard();
    model
        .forward(&blip_peft::blip::ForwardInputs {
            pixel_values: pixels,
            input_ids: ids,
            attention_mask: None,
            labels: None,
        })
        .unwrap()
        .logits
        .log_softmax(-1, Kind::Float)
}

/// A token greedy decoding of image 0 emits early, but not as its first new token: as the EOS, it ends that
/// caption early while the others may run on. Returns the token and the number of new tokens image 0 then
/// generates.
fn early_eos(model: &BlipForConditionalGeneration, pixels: &Tensor) -> (i64, usize) {
    let config = GenerationConfig {
        max_new_tokens: Some(6),
        eos_token_id: Some(98),
        ..Default::default()
    };
    let row = &rows(&gen(model, pixels, &config))[0];
    let p = (2..row.len()).find(|&p| !row[1..p].contains(&row[p])).unwrap();
    (row[p], p)
}

/// Greedy decoding (through the cache, rows leaving as they finish) picks at every step the argmax of what
/// the full forward pass gives for the tokens so far, EOS banned while `min_new_tokens` are not reached;
/// rows stop at their EOS and are padded with `pad_token_id` after it.
#[test]
fn greedy_tokens_are_the_argmax_of_forward_logits() {
    let _rng = global_rng();
    let model = tiny_model();
    let px = pixels(4, 1);
    let (eos, ends_at) = early_eos(&model, &px);
    for min_new in [0, 3] {
        let config = GenerationConfig {
            max_new_tokens: Some(9),
            min_new_tokens: min_new,
            eos_token_id: Some(eos),
            pad_token_id: Some(7),
            ..Default::default()
        };
        let ids = gen(&model, &px, &config);
        let out = rows(&ids);
        assert!(ids.size()[1] <= 1 + 9);
        let lengths: Vec<usize> = out.iter().map(|r| generated(r, 1, eos)).collect();
        assert_eq!(
            *lengths.iter().max().unwrap() as i64,
            ids.size()[1] - 1,
            "{out:?}"
        );
        if min_new == 0 {
            assert_eq!(lengths[0], ends_at, "image 0 ends at its EOS: {out:?}");
        }
        let log_probs = forward_log_probs(&model, &px, &ids);
        for (i, row) in out.iter().enumerate() {
            let n = lengths[i];
            assert!(
                n >= min_new as usize,
                "row {i} ended before min_new_tokens: {row:?}"
            );
            for j in 0..n {
                let mut scores = log_probs.get(i as i64).get(j as i64);
                if (j as i64) < min_new {
                    scores = scores.index_fill(0, &Tensor::from_slice(&[eos]), f64::NEG_INFINITY);
                }
                let best = i64::try_from(scores.argmax(0, false)).unwrap();
                assert_eq!(row[1 + j], best, "row {i}, new token {j}: {row:?}");
            }
            assert!(
                row[1 + n..].iter().all(|&t| t == 7),
                "row {i} is not padded: {row:?}"
            );
        }
    }
}

/// Sampling with `top_k=1` keeps only the best token: it is greedy decoding. (`num_beams=1` *is* greedy by
/// dispatch, so comparing it with greedy would test nothing.)
#[test]
fn sampling_with_top_k_1_is_greedy() {
    let _rng = global_rng();
    let model = tiny_model();
    let px = pixels(3, 2);
    let greedy = GenerationConfig {
        max_new_tokens: Some(8),
        ..Default::default()
    };
    let top1 = GenerationConfig {
        do_sample: true,
        top_k: 1,
        temperature: 3.0,
        seed: Some(5),
        ..greedy.clone()
    };
    assert!(gen(&model, &px, &greedy).equal(&gen(&model, &px, &top1)));
}

/// A seed gives the same draws whatever ran before; another seed gives other draws; an image's
/// `num_return_sequences` rows are consecutive draws of their own.
#[test]
fn a_seed_repeats_its_samples() {
    let _rng = global_rng();
    let model = tiny_model();
    let px = pixels(2, 3);
    let config = |seed| GenerationConfig {
        do_sample: true,
        temperature: 2.0,
        num_return_sequences: 3,
        max_new_tokens: Some(8),
        seed: Some(seed),
        ..Default::default()
    };
    let a = gen(&model, &px, &config(7));
    assert_eq!(a.size()[0], 2 * 3);
    let _ = Tensor::randn([1000], (Kind::Float, Device::Cpu)); // moves the global generator on
    let b = gen(&model, &px, &config(7));
    assert!(a.equal(&b), "{:?}\n{:?}", rows(&a), rows(&b));
    let c = gen(&model, &px, &config(8));
    assert!(!a.equal(&c));
    let out = rows(&a);
    assert!(
        out[0] != out[1] || out[1] != out[2],
        "3 draws, one caption: {out:?}"
    );
}

/// The score transformers ranks a finished hypothesis by: its tokens' log-probabilities summed (from the
/// model's forward logits, no processor active) over its length to the power `length_penalty`.
fn hypothesis_score(log_probs: &Tensor, row: &[i64], prompt: usize, eos: i64, length_penalty: f64) -> f64 {
    let n = generated(row, prompt, eos);
    let sum: f64 = (0..n)
        .map(|j| {
            let p = prompt + j;
            f64::try_from(log_probs.get(p as i64 - 1).get(row[p])).unwrap()
        })
        .sum();
    sum / (n as f64).powf(length_penalty)
}

/// Beam search returns `num_return_sequences` rows per image, consecutive, distinct and best first (by
/// transformers' length-penalised score), each row what the image gets alone; rows that finished early are
/// filled with transformers' beam fill (`pad_token_id or eos_token_id`); no row exceeds `max_new_tokens` or
/// ends before `min_new_tokens`.
#[test]
fn beam_search_returns_its_best_hypotheses_in_order() {
    let _rng = global_rng();
    let model = tiny_model();
    let px = pixels(3, 4);
    let (eos, _) = early_eos(&model, &px);
    for (beams, nrs, early_stopping, length_penalty, min_new, pad) in [
        (4, 4, EarlyStopping::False, 1.0, 0, PAD),
        (3, 2, EarlyStopping::True, 0.5, 0, 5),
        (4, 3, EarlyStopping::Never, 0.5, 3, PAD),
    ] {
        let config = GenerationConfig {
            num_beams: beams,
            num_return_sequences: nrs,
            early_stopping,
            length_penalty,
            max_new_tokens: Some(8),
            min_new_tokens: min_new,
            eos_token_id: Some(eos),
            pad_token_id: Some(pad),
            ..Default::default()
        };
        let fill = if pad != 0 { pad } else { eos };
        let ids = gen(&model, &px, &config);
        let case = format!("{beams} beams, {nrs} returned, {early_stopping:?}");
        assert_eq!(ids.size()[0], 3 * nrs, "{case}");
        assert!(ids.size()[1] <= 1 + 8, "{case}");
        let out = rows(&ids);
        let longest = out.iter().map(|r| generated(r, 1, eos)).max().unwrap();
        assert_eq!(longest as i64, ids.size()[1] - 1, "{case}: {out:?}");
        let log_probs = forward_log_probs(&model, &px.repeat_interleave_self_int(nrs, 0, None), &ids);
        let mut some_ended_early = false;
        for image in 0..3 {
            let group = &out[(image * nrs) as usize..((image + 1) * nrs) as usize];
            let alone = rows(&gen(&model, &px.narrow(0, image, 1), &config));
            let scores: Vec<f64> = (0..nrs as usize)
                .map(|k| {
                    let row = &group[k];
                    let n = generated(row, 1, eos);
                    assert!(n >= min_new as usize, "{case}: {row:?}");
                    assert!(
                        row[1 + n..].iter().all(|&t| t == fill),
                        "{case}: not filled: {row:?}"
                    );
                    some_ended_early |= n < 8;
                    assert_eq!(row[..alone[k].len()], alone[k][..], "{case}, image {image} alone");
                    let r = (image * nrs) as usize + k;
                    hypothesis_score(&log_probs.get(r as i64), row, 1, eos, length_penalty)
                })
                .collect();
            for k in 1..group.len() {
                assert!(
                    !group[..k].contains(&group[k]),
                    "{case}: a hypothesis twice: {group:?}"
                );
                assert!(
                    scores[k] <= scores[k - 1] + 1e-4,
                    "{case}, image {image}: not best first: {scores:?}"
                );
            }
        }
        if min_new == 0 {
            // (With min_new_tokens = 3 the EOS this model emits early is banned, and every hypothesis runs on.)
            assert!(
                some_ended_early,
                "{case}: every hypothesis ran to max_new_tokens: {out:?}"
            );
        }
    }
}

/// `max_length` counts the prompt; prompts of different lengths (an attention mask) give each row what it
/// gets alone, right-padded.
#[test]
fn length_limits_and_ragged_prompts() {
    let _rng = global_rng();
    let model = tiny_model();
    let px = pixels(2, 5);
    for beams in [1, 3] {
        let config = GenerationConfig {
            num_beams: beams,
            max_length: Some(6),
            min_length: 6,
            ..Default::default()
        };
        assert_eq!(gen(&model, &px, &config).size(), [2, 6], "{beams} beams");
        // As the processor gives them: [CLS] (here 1) prompt [SEP] (here 2); generation starts from BOS + prompt.
        let ids = Tensor::from_slice(&[1i64, 11, 12, 13, 2, 1, 21, 2, 0, 0]).view([2, 5]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 5]);
        let config = GenerationConfig {
            num_beams: beams,
            max_new_tokens: Some(5),
            min_new_tokens: 5,
            ..Default::default()
        };
        let both = rows(&generate(&model, &px, Some(&ids), Some(&mask), &config).unwrap());
        for (i, (prompt, width)) in [(vec![BOS, 11, 12, 13], 5), (vec![BOS, 21], 3)]
            .into_iter()
            .enumerate()
        {
            let i64i = i as i64;
            let one = ids.narrow(0, i64i, 1).narrow(1, 0, width);
            let alone = rows(&generate(&model, &px.narrow(0, i64i, 1), Some(&one), None, &config).unwrap());
            assert_eq!(alone[0].len(), prompt.len() + 5);
            assert_eq!(alone[0][..prompt.len()], prompt[..]);
            assert_eq!(both[i][..alone[0].len()], alone[0][..], "{beams} beams, row {i}");
            assert!(both[i][alone[0].len()..].iter().all(|&t| t == PAD), "{both:?}");
        }
    }
}

/// `interpolate_pos_encoding`: other resolutions are refused without it; with it the position embeddings are
/// resampled to the image's grid (unchanged at the checkpoint's size), and generate takes such images too.
#[test]
fn interpolate_pos_encoding_runs_other_resolutions() {
    use blip_peft::nn::ForwardContext;
    let model = tiny_model();
    tch::manual_seed(5);
    let big = Tensor::randn([2, 3, 48, 40], (Kind::Float, Device::Cpu));
    let plain = ForwardContext::INFERENCE;
    let interpolating = plain.with_interpolate_pos_encoding(true);
    let err = model.check_pixel_values(&big, &plain).unwrap_err().to_string();
    assert!(err.contains("interpolate_pos_encoding=True"), "{err}");
    let pv = model.check_pixel_values(&big, &interpolating).unwrap();
    let patch = model.config.vision_config.patch_size;
    let embeds = model.encode_images(&pv, &interpolating).unwrap();
    assert_eq!(embeds.size()[1], (48 / patch) * (40 / patch) + 1);
    let small = Tensor::randn([1, 3, patch - 1, 32], (Kind::Float, Device::Cpu));
    assert!(model.check_pixel_values(&small, &interpolating).is_err());
    // At the checkpoint's size the interpolating path is the plain one, bit for bit.
    let native = pixels(2, 1);
    let a = model.encode_images(&native, &plain).unwrap();
    let b = model.encode_images(&native, &interpolating).unwrap();
    assert!(a.equal(&b));
    let config = GenerationConfig {
        max_new_tokens: Some(5),
        interpolate_pos_encoding: true,
        ..Default::default()
    };
    assert_eq!(gen(&model, &big, &config).size()[0], 2);
    let refused = generate(&model, &big, None, None, &GenerationConfig::default());
    assert!(refused.is_err());
}
