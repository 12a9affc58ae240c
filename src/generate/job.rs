//! The prologue every strategy shares, written once: the settings checked and resolved against the model
//! (special ids, the length limit), the prompts prepared, the seed set and the images encoded.

use tch::{Device, Kind, Tensor};

use super::config::GenerationConfig;
use super::driver::Decoder;
use super::logits::Processors;
use super::prompt::{prompts, Prompts};
use crate::blip::text::BlipTextLmHeadModel;
use crate::blip::{BlipForConditionalGeneration, BlipForQuestionAnswering};
use crate::config::BlipTextConfig;
use crate::error::{Error, Result};
use crate::nn::{AdapterRows, ForwardContext};

/// One `generate` call, ready to decode.
pub(super) struct Job<'a> {
    /// The decoder the strategies step (the captioner's, or VQA's answer decoder).
    pub model: &'a BlipTextLmHeadModel,
    pub device: Device,
    pub config: &'a GenerationConfig,
    /// What the decoder cross-attends to, `[B, N, D]`, one row per image: the image embeddings (captions), or
    /// the question encoding (VQA answers).
    pub image: Tensor,
    /// A mixed-adapter batch: each image's adapter (its rows inherit it).
    pub adapters: Option<AdapterRows>,
    pub prompts: Prompts,
    /// The length the sequences may reach, prompt included.
    pub max_length: i64,
    pub eos: Option<i64>,
    pub pad: i64,
}

impl<'a> Job<'a> {
    pub fn prepare(
        model: &'a BlipForConditionalGeneration,
        pixel_values: &Tensor,
        input_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        adapter_names: Option<&[String]>,
        config: &'a GenerationConfig,
    ) -> Result<Self> {
        config.validate()?;
        let tc = &model.config.text_config;
        config.validate_for(tc.vocab_size)?;
        let bos = config.bos_token_id.unwrap_or(tc.bos_token_id);
        // BLIP generates until [SEP] (transformers passes sep_token_id as the EOS) and pads with pad_token_id.
        let eos = Some(config.eos_token_id.unwrap_or(tc.sep_token_id));
        let pad = config.pad_token_id.unwrap_or(tc.pad_token_id);
        // BOS is embedded (the first position of every row); an EOS outside the vocabulary is never produced.
        if bos < 0 || bos >= tc.vocab_size {
            let name = match config.bos_token_id {
                Some(_) => "bos_token_id",
                None => "the config's text_config.bos_token_id",
            };
            return Err(Error::invalid(format!(
                "{name} ({bos}) is not a token id of the vocabulary (0 to {}): generate() starts every caption \
                 with it; pass bos_token_id=<an id below text_config.vocab_size>",
                tc.vocab_size - 1
            )));
        }
        // Generation runs as inference (no dropout, whatever mode the model is in), with the decoding kernel.
        let cx = ForwardContext::DECODING.with_interpolate_pos_encoding(config.interpolate_pos_encoding);
        let pixel_values = model.check_pixel_values(pixel_values, &cx)?;
        let batch = pixel_values.size()[0];
        // Generation runs as inference whatever mode the model is in, so adapter_names is always allowed here.
        let adapters = adapter_names
            .map(|names| crate::lora::mixed::adapter_rows(model, names, batch, false))
            .transpose()?;
        let prompts = prompts(
            model.device(),
            tc.vocab_size,
            batch,
            input_ids,
            attention_mask,
            bos,
        )?;
        let max_length = settle_length(tc, config, &prompts)?;
        check_memory(tc, model.kind(), model.device(), config, batch, max_length)?;
        if let Some(seed) = config.seed {
            tch::manual_seed(seed);
        }
        let image_cx = cx.with_adapters(adapters.as_ref(), adapters.as_ref());
        let image = model.encode_images(&pixel_values, &image_cx)?;
        Ok(Self {
            model: &model.text_decoder,
            device: model.device(),
            config,
            image,
            adapters,
            prompts,
            max_length,
            eos,
            pad,
        })
    }

    /// transformers' `BlipForQuestionAnswering.generate`: the question (`question`, `[B, Tq]`, with its padding
    /// `question_mask`) encoded over the image, the answer decoded from BOS (`text_config.bos_token_id`, the
    /// decoder's start token) over the whole question encoding (transformers' mask there is all ones), ending
    /// at `[SEP]`, padded with `pad_token_id`.
    pub fn prepare_answers(
        model: &'a BlipForQuestionAnswering,
        pixel_values: &Tensor,
        question: &Tensor,
        question_mask: Option<&Tensor>,
        adapter_names: Option<&[String]>,
        config: &'a GenerationConfig,
    ) -> Result<Self> {
        config.validate()?;
        let tc = &model.config.text_config;
        config.validate_for(tc.vocab_size)?;
        let bos = tc.bos_token_id;
        let eos = Some(config.eos_token_id.unwrap_or(tc.sep_token_id));
        let pad = config.pad_token_id.unwrap_or(tc.pad_token_id);
        if bos < 0 || bos >= tc.vocab_size {
            return Err(Error::invalid(format!(
                "the config's text_config.bos_token_id ({bos}) is not a token id of the vocabulary (0 to {}): \
                 generate() starts every answer with it",
                tc.vocab_size - 1
            )));
        }
        let cx = ForwardContext::DECODING.with_interpolate_pos_encoding(config.interpolate_pos_encoding);
        let pixel_values = model.check_pixel_values(pixel_values, &cx)?;
        let batch = pixel_values.size()[0];
        let question = model.check_ids(question, "input_ids", batch)?;
        let question_mask =
            model.check_mask(question_mask, "attention_mask", "input_ids", &question.size())?;
        let adapters = adapter_names
            .map(|names| crate::lora::mixed::adapter_rows(model, names, batch, false))
            .transpose()?;
        let prompts = prompts(model.device(), tc.vocab_size, batch, None, None, bos)?;
        let max_length = settle_length(tc, config, &prompts)?;
        check_memory(tc, model.kind(), model.device(), config, batch, max_length)?;
        if let Some(seed) = config.seed {
            tch::manual_seed(seed);
        }
        // The vision tower and the question encoder run each image's adapter (one question per image).
        let cx = cx.with_adapters(adapters.as_ref(), adapters.as_ref());
        let image = model.encode_images(&pixel_values, &cx)?;
        let question = model.encode_questions(&question, question_mask.as_ref(), &image, &cx)?;
        Ok(Self {
            model: &model.text_decoder,
            device: model.device(),
            config,
            image: question,
            adapters,
            prompts,
            max_length,
            eos,
            pad,
        })
    }

    /// Whether any token can be generated (else the prompts are the answer).
    pub fn has_room(&self) -> bool {
        self.prompts.width() < self.max_length
    }

    /// The prompts alone, once per returned sequence.
    pub fn prompts_only(&self) -> Result<Tensor> {
        Ok(self
            .prompts
            .ids
            .f_repeat_interleave_self_int(self.config.num_return_sequences, 0, None)?)
    }

    /// The logits processors for rows whose prompt has `prompt_len` tokens.
    pub fn processors(&self, prompt_len: i64) -> Processors<'a> {
        Processors {
            config: self.config,
            eos: self.eos,
            prompt_len,
        }
    }

    /// Image `i` with its own prompt (unpadded), as if it had been the only one: the length limit keeps the
    /// number of new tokens the batch allows.
    pub fn alone(&self, i: usize) -> Result<Job<'a>> {
        let l = self.prompts.lengths[i];
        let i = i as i64;
        Ok(Job {
            model: self.model,
            device: self.device,
            config: self.config,
            image: self.image.f_narrow(0, i, 1)?,
            adapters: self.adapters.as_ref().map(|a| a.select(&[i])),
            prompts: Prompts {
                ids: self.prompts.ids.f_narrow(0, i, 1)?.f_narrow(1, 0, l)?,
                lengths: vec![l],
            },
            max_length: self.max_length - self.prompts.width() + l,
            eos: self.eos,
            pad: self.pad,
        })
    }

    /// Starts decoding `per_image` rows per image: the prompts run through the decoder, which takes the image
    /// embeddings over (the job keeps none, so the embeddings of images that leave the batch are freed).
    /// Returns the decoder and the logits of each row's next token.
    pub fn start(&mut self, per_image: i64) -> Result<(Decoder<'a>, Tensor)> {
        let image = std::mem::replace(&mut self.image, Tensor::new());
        let adapters = self.adapters.clone();
        Decoder::prefill(
            self.model,
            image,
            adapters,
            &self.prompts,
            per_image,
            self.max_length,
        )
    }
}

/// The length the sequences may reach (prompt included), as transformers resolves it, with the checks of
/// minimum lengths the positions cannot reach.
fn settle_length(tc: &BlipTextConfig, config: &GenerationConfig, prompts: &Prompts) -> Result<i64> {
    let prompt_len = prompts.width();
    let max_length = match (config.max_new_tokens, config.max_length) {
        // Saturating: max_new_tokens=2**63-1 means "as many as fit", not an overflow to no tokens.
        (Some(m), _) => prompt_len.saturating_add(m),
        (None, Some(m)) => m,
        // transformers: by default 20 new tokens, within the position limit.
        (None, None) => (prompt_len + 20).min(tc.max_position_embeddings),
    };
    if prompt_len >= tc.max_position_embeddings {
        return Err(Error::invalid(format!(
            "the prompt ({prompt_len} tokens with BOS) does not fit the model's {} positions \
             (text_config.max_position_embeddings); shorten the prompt",
            tc.max_position_embeddings
        )));
    }
    // Generation stops at the model's position limit (transformers caps its default length the same way).
    let max_length = max_length.min(tc.max_position_embeddings);
    // A minimum the positions cannot reach would be quietly unmet: refuse it (a user-set max_length below
    // the minimum stays transformers' behaviour: generation stops at max_length).
    let positions = tc.max_position_embeddings;
    if config.min_length > positions {
        return Err(Error::invalid(format!(
            "min_length={} is past the model's {positions} positions (text_config.max_position_embeddings), \
             so it could never be met; use at most {positions}",
            config.min_length
        )));
    }
    if prompt_len.saturating_add(config.min_new_tokens) > positions {
        return Err(Error::invalid(format!(
            "min_new_tokens={} with a prompt of {prompt_len} tokens (BOS included) is past the model's \
             {positions} positions (text_config.max_position_embeddings), so it could never be met; use at \
             most {}",
            config.min_new_tokens,
            positions - prompt_len
        )));
    }
    Ok(max_length)
}

/// Refuses, before anything is allocated, a request (images x beams or returned sequences) whose decoding
/// cache and logits alone need more memory than the machine has, naming the settings.
fn check_memory(
    tc: &BlipTextConfig,
    kind: Kind,
    device: Device,
    config: &GenerationConfig,
    batch: i64,
    max_length: i64,
) -> Result<()> {
    let per_image = if config.num_beams > 1 {
        config.num_beams
    } else {
        config.num_return_sequences
    };
    let element = kind.elt_size_in_bytes() as u128;
    let rows = (batch as u128).checked_mul(per_image.max(config.num_return_sequences) as u128);
    // The self-attention cache (keys and values per layer and position) and a few logits buffers per row.
    let per_row = (2 * tc.num_hidden_layers as u128)
        .checked_mul(max_length as u128)
        .and_then(|n| n.checked_mul(tc.hidden_size as u128))
        .and_then(|n| n.checked_add(4 * tc.vocab_size as u128))
        .and_then(|n| n.checked_mul(element.max(4)));
    let bytes = rows.zip(per_row).and_then(|(r, p)| r.checked_mul(p));
    crate::device::check_fits(
        bytes,
        device,
        &format!(
            "generate() for {batch} image(s) with num_beams={} and num_return_sequences={} ({} decoder rows of up \
             to {max_length} tokens)",
            config.num_beams,
            config.num_return_sequences,
            rows.map_or("too many".to_string(), |r| r.to_string())
        ),
        "use fewer images per call, or lower num_beams / num_return_sequences",
    )
}
