//! Caption generation with transformers' semantics: greedy, sampling and beam search over the BLIP decoder,
//! with its logits processors (repetition penalty, no-repeat n-grams, minimum lengths, temperature, top-k,
//! top-p). The decoder keeps a preallocated key/value cache; image keys/values are computed once per image
//! and shared by its beams. Rows whose caption ended (in beam search: images whose beams can no longer change)
//! leave the batch, cache and image keys/values included, so they stop costing compute; what is returned, and
//! what a seed draws, stays transformers'.
//!
//! The token layout is transformers': `[BOS, prompt..., new tokens..., pad...]`, where BLIP's `generate`
//! replaces the prompt's first token by BOS and drops its last (the processor's `[SEP]`). Prompts of
//! different lengths (given with an attention mask) are handled per row: each row is generated as if it
//! were alone, and rows are right-padded in the output.

use tch::{Device, Kind, Tensor};

use crate::blip::kv_cache::DecoderCache;
use crate::blip::text::DecoderMasks;
use crate::blip::BlipForConditionalGeneration;
use crate::error::{Error, Result};
use crate::nn::attention::finfo_min;

/// transformers' `early_stopping`: `True`, `False` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    True,
    False,
    Never,
}

/// Decoding settings, with transformers' names and defaults.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: Option<i64>,
    pub max_length: Option<i64>,
    pub min_new_tokens: i64,
    pub min_length: i64,
    pub num_beams: i64,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub num_return_sequences: i64,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub no_repeat_ngram_size: i64,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
    pub seed: Option<i64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            max_length: None,
            min_new_tokens: 0,
            min_length: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            seed: None,
        }
    }
}

impl GenerationConfig {
    /// The checks transformers makes (and a few it leaves to a crash), before any work starts.
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = self.max_new_tokens {
            if m < 1 {
                return Err(Error::invalid(format!(
                    "max_new_tokens must be at least 1, got {m}"
                )));
            }
        }
        if let Some(m) = self.max_length {
            if m < 1 {
                return Err(Error::invalid(format!("max_length must be at least 1, got {m}")));
            }
        }
        if self.num_beams < 1 {
            return Err(Error::invalid(format!(
                "num_beams must be at least 1, got {}",
                self.num_beams
            )));
        }
        if self.num_return_sequences < 1 {
            return Err(Error::invalid(format!(
                "num_return_sequences must be at least 1, got {}",
                self.num_return_sequences
            )));
        }
        if !self.do_sample && self.num_return_sequences > self.num_beams {
            return Err(Error::invalid(format!(
                "num_return_sequences ({}) cannot exceed num_beams ({}) without sampling; set do_sample=True or \
                 raise num_beams",
                self.num_return_sequences, self.num_beams
            )));
        }
        if self.do_sample && self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return Err(Error::invalid(
                "num_return_sequences cannot exceed num_beams in beam sampling",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return Err(Error::invalid(format!(
                "temperature must be a positive number, got {} (use do_sample=False for greedy decoding)",
                self.temperature
            )));
        }
        if self.top_k < 0 {
            return Err(Error::invalid(format!(
                "top_k must be 0 (off) or positive, got {}",
                self.top_k
            )));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(Error::invalid(format!(
                "repetition_penalty must be positive, got {}",
                self.repetition_penalty
            )));
        }
        if self.no_repeat_ngram_size < 0 || self.min_new_tokens < 0 || self.min_length < 0 {
            return Err(Error::invalid(
                "no_repeat_ngram_size, min_new_tokens and min_length must not be negative",
            ));
        }
        Ok(())
    }
}

/// A batch of prompts: `[B, P]` ids, left-aligned per row (`lengths[i]` real tokens, the rest padding).
struct Prompts {
    ids: Tensor,
    lengths: Vec<i64>,
}

impl Prompts {
    fn width(&self) -> i64 {
        self.lengths.iter().copied().max().unwrap_or(1)
    }

    fn ragged(&self) -> bool {
        self.lengths.iter().any(|&l| l != self.width())
    }
}

/// Builds the per-row prompts BLIP's `generate` decodes from: BOS, then the prompt minus its last token.
fn prompts(
    model: &BlipForConditionalGeneration,
    batch: i64,
    input_ids: Option<&Tensor>,
    attention_mask: Option<&Tensor>,
    bos: i64,
) -> Result<Prompts> {
    let device = model.device();
    let Some(ids) = input_ids else {
        return Ok(Prompts {
            ids: Tensor::f_full([batch, 1], bos, (Kind::Int64, device))?,
            lengths: vec![1; batch as usize],
        });
    };
    if ids.dim() != 2
        || !matches!(
            ids.kind(),
            Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
        )
    {
        return Err(Error::invalid(format!(
            "input_ids must be integer token ids of shape [batch, length], got {:?} {:?}",
            ids.kind(),
            ids.size()
        )));
    }
    let (b, t) = ids.size2()?;
    if b != batch {
        return Err(Error::invalid(format!(
            "input_ids has batch size {b} but pixel_values has {batch}"
        )));
    }
    let ids = ids.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
    let rows: Vec<Vec<i64>> = (0..b)
        .map(|i| Vec::<i64>::try_from(ids.f_get(i)?).map_err(Error::from))
        .collect::<Result<_>>()?;
    let masks: Vec<Vec<i64>> = match attention_mask {
        None => vec![vec![1; t as usize]; b as usize],
        Some(m) => {
            if m.size() != [b, t] {
                return Err(Error::invalid(format!(
                    "attention_mask has shape {:?} but input_ids has {:?}",
                    m.size(),
                    [b, t]
                )));
            }
            let m = m.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
            (0..b)
                .map(|i| Vec::<i64>::try_from(m.f_get(i)?).map_err(Error::from))
                .collect::<Result<_>>()?
        }
    };
    let vocab = model.config.text_config.vocab_size;
    let mut per_row = Vec::with_capacity(b as usize);
    for (row, mask) in rows.iter().zip(&masks) {
        let real: Vec<i64> = row
            .iter()
            .zip(mask)
            .filter(|(_, m)| **m != 0)
            .map(|(t, _)| *t)
            .collect();
        if real.iter().any(|&t| t < 0 || t >= vocab) {
            return Err(Error::invalid(format!(
                "input_ids must be token ids in [0, {vocab})"
            )));
        }
        // transformers: the first token becomes BOS and the last one (the processor's [SEP]) is dropped.
        let mut prompt: Vec<i64> = real.iter().take(real.len().saturating_sub(1)).copied().collect();
        if prompt.is_empty() {
            prompt.push(bos);
        } else {
            prompt[0] = bos;
        }
        per_row.push(prompt);
    }
    let width = per_row.iter().map(Vec::len).max().unwrap_or(1);
    let mut flat = Vec::with_capacity(width * per_row.len());
    for p in &per_row {
        flat.extend_from_slice(p);
        flat.extend(std::iter::repeat_n(0, width - p.len()));
    }
    let ids = Tensor::f_from_slice(&flat)?
        .f_view([b, width as i64])?
        .f_to_device(device)?;
    Ok(Prompts {
        ids,
        lengths: per_row.iter().map(|p| p.len() as i64).collect(),
    })
}

/// Everything one decoding run shares: the image keys/values, the cache, positions and the padding mask.
struct Decoder<'a> {
    model: &'a BlipForConditionalGeneration,
    image: Tensor,
    cache: DecoderCache,
    /// `[R, max_len]` 1 where a key is real, only for ragged prompts (else a plain causal mask suffices).
    key_mask: Option<Tensor>,
    /// `[R]` the position of each row's next token.
    next_pos: Tensor,
    /// The rows of each forward pass, for [`GenerationStats`].
    rows_per_step: Vec<i64>,
}

impl<'a> Decoder<'a> {
    /// Runs the prompts `[R, P]` (rows `per_image` per image) through the decoder; returns last-position logits.
    fn prefill(
        model: &'a BlipForConditionalGeneration,
        image: Tensor,
        prompts: &Prompts,
        per_image: i64,
        max_len: i64,
    ) -> Result<(Self, Tensor)> {
        let device = model.device();
        let ids = prompts.ids.f_repeat_interleave_self_int(per_image, 0, None)?;
        let rows = ids.size()[0];
        let width = prompts.width();
        let lengths: Vec<i64> = prompts
            .lengths
            .iter()
            .flat_map(|&l| std::iter::repeat_n(l, per_image as usize))
            .collect();
        let mut cache = model.text_decoder.new_cache(rows, per_image, max_len)?;
        let lengths_t = Tensor::f_from_slice(&lengths)?.f_to_device(device)?;
        let (key_mask, positions, hidden_idx) = if prompts.ragged() {
            // Rows are left-aligned: real tokens first, padding after. Each row's positions count from 0.
            let cols = Tensor::f_arange(max_len, (Kind::Int64, device))?.f_unsqueeze(0)?;
            let key_mask = cols
                .f_lt_tensor(&lengths_t.f_unsqueeze(1)?)?
                .f_to_kind(Kind::Int64)?;
            let positions = Tensor::f_arange(width, (Kind::Int64, device))?;
            (Some(key_mask), positions, Some(lengths_t.f_sub_scalar(1)?))
        } else {
            (None, Tensor::f_arange(width, (Kind::Int64, device))?, None)
        };
        let additive = match &key_mask {
            Some(km) => Some(crate::nn::attention::causal_padding_mask(
                &km.f_narrow(1, 0, width)?,
                width,
                model.text_decoder.kind(),
            )?),
            None => None,
        };
        let masks = DecoderMasks {
            self_mask: additive.as_ref(),
            causal: additive.is_none(),
        };
        let hidden = model
            .text_decoder
            .decode_step(&ids, &positions, &image, &masks, &mut cache)?;
        // The last real token of each row predicts its next token.
        let last = match hidden_idx {
            Some(idx) => hidden.f_gather(
                1,
                &idx.f_view([-1, 1, 1])?
                    .f_expand([rows, 1, hidden.size()[2]], false)?,
                false,
            )?,
            None => hidden.f_narrow(1, width - 1, 1)?,
        };
        let logits = model
            .text_decoder
            .logits(&last, false)?
            .f_squeeze_dim(1)?
            .f_to_kind(Kind::Float)?;
        let next_pos = lengths_t;
        let mut decoder = Self {
            model,
            image,
            cache,
            key_mask,
            next_pos,
            rows_per_step: vec![rows],
        };
        if decoder.key_mask.is_some() {
            // Ragged rows continue at their own length; the cache slots between are masked out.
            decoder.cache.len = width;
        }
        Ok((decoder, logits))
    }

    /// Feeds one new token per row; returns the logits for the token after it.
    fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        let slot = self.cache.len;
        let additive = match &mut self.key_mask {
            Some(km) => {
                let _ = km.f_narrow(1, slot, 1)?.f_fill_(1)?;
                let visible = km.f_narrow(1, 0, slot + 1)?;
                let kind = self.model.text_decoder.kind();
                let zero = Tensor::f_zeros([], (kind, visible.device()))?;
                let min = Tensor::f_full([], finfo_min(kind), (kind, visible.device()))?;
                Some(
                    zero.f_where_self(&visible.f_ne(0)?, &min)?
                        .f_unsqueeze(1)?
                        .f_unsqueeze(1)?,
                )
            }
            None => None,
        };
        let positions = self.next_pos.f_unsqueeze(1)?;
        self.rows_per_step.push(tokens.size()[0]);
        let masks = DecoderMasks {
            self_mask: additive.as_ref(),
            causal: false,
        };
        let hidden = self.model.text_decoder.decode_step(
            &tokens.f_unsqueeze(1)?,
            &positions,
            &self.image,
            &masks,
            &mut self.cache,
        )?;
        self.next_pos = self.next_pos.f_add_scalar(1)?;
        Ok(self
            .model
            .text_decoder
            .logits(&hidden, false)?
            .f_squeeze_dim(1)?
            .f_to_kind(Kind::Float)?)
    }

    /// Keeps the rows `rows` (old row indices, which may also reorder beams), new row `r` belonging to the old
    /// image `row_image[r]` (ascending): the other rows finished, and images without rows drop their keys/values.
    fn select(&mut self, rows: &Tensor, row_image: &[i64]) -> Result<()> {
        if let Some(images) = self.cache.select_rows(rows, row_image)? {
            self.image = self.image.f_index_select(0, &images)?;
        }
        if let Some(km) = &self.key_mask {
            self.key_mask = Some(km.f_index_select(0, rows)?);
        }
        self.next_pos = self.next_pos.f_index_select(0, rows)?;
        Ok(())
    }

    /// Keeps the rows at positions `keep` (ascending; the other rows finished).
    fn keep_rows(&mut self, keep: &[i64]) -> Result<()> {
        let row_image: Vec<i64> = keep.iter().map(|&r| self.cache.row_image()[r as usize]).collect();
        let rows = Tensor::f_from_slice(keep)?.f_to_device(self.next_pos.device())?;
        self.select(&rows, &row_image)
    }

    fn reorder(&mut self, index: &Tensor) -> Result<()> {
        self.cache.reorder(index)?;
        if let Some(km) = &self.key_mask {
            self.key_mask = Some(km.f_index_select(0, index)?);
        }
        self.next_pos = self.next_pos.f_index_select(0, index)?;
        Ok(())
    }
}

/// The logits processors transformers applies, in its order.
struct Processors<'a> {
    config: &'a GenerationConfig,
    eos: Option<i64>,
    prompt_len: i64,
}

impl Processors<'_> {
    /// Whether any processor looks at the tokens generated so far (else the history need not be gathered).
    fn reads_history(&self) -> bool {
        self.config.repetition_penalty != 1.0 || self.config.no_repeat_ngram_size > 0
    }

    /// `scores` `[R, V]` for rows whose tokens so far are `seqs` `[R, cur_len]`.
    fn apply(&self, seqs: &Tensor, scores: Tensor, min_tokens_to_keep: i64) -> Result<Tensor> {
        let c = self.config;
        let cur_len = seqs.size()[1];
        let mut scores = scores;
        if c.repetition_penalty != 1.0 {
            let picked = scores.f_gather(1, seqs, false)?;
            let neg = picked.f_lt(0.0)?;
            let penalised = picked
                .f_mul_scalar(c.repetition_penalty)?
                .f_where_self(&neg, &picked.f_div_scalar(c.repetition_penalty)?)?;
            scores = scores.f_scatter(1, seqs, &penalised)?;
        }
        if c.no_repeat_ngram_size > 0 && cur_len >= c.no_repeat_ngram_size {
            scores = ban_repeated_ngrams(seqs, scores, c.no_repeat_ngram_size)?;
        }
        if let Some(eos) = self.eos {
            if cur_len < c.min_length || cur_len - self.prompt_len < c.min_new_tokens {
                let _ = scores.f_narrow(1, eos, 1)?.f_fill_(f64::NEG_INFINITY)?;
            }
        }
        if c.do_sample {
            if c.temperature != 1.0 {
                scores = scores.f_div_scalar(c.temperature)?;
            }
            let vocab = scores.size()[1];
            if c.top_k > 0 {
                let k = c.top_k.max(min_tokens_to_keep).min(vocab);
                let (values, _) = scores.f_topk(k, -1, true, true)?;
                let threshold = values.f_narrow(1, k - 1, 1)?;
                scores = scores.f_masked_fill(&scores.f_lt_tensor(&threshold)?, f64::NEG_INFINITY)?;
            }
            if c.top_p < 1.0 {
                let (sorted, indices) = scores.f_sort(-1, false)?;
                let cumulative = sorted.f_softmax(-1, Kind::Float)?.f_cumsum(-1, Kind::Float)?;
                let remove = cumulative.f_le(1.0 - c.top_p)?;
                let keep_tail = min_tokens_to_keep.min(vocab);
                let _ = remove.f_narrow(1, vocab - keep_tail, keep_tail)?.f_fill_(0)?;
                let remove = remove.f_scatter(1, &indices, &remove)?;
                scores = scores.f_masked_fill(&remove, f64::NEG_INFINITY)?;
            }
        }
        Ok(scores)
    }
}

/// transformers' `NoRepeatNGramLogitsProcessor`: a token that would repeat an n-gram of the row is banned.
fn ban_repeated_ngrams(seqs: &Tensor, scores: Tensor, n: i64) -> Result<Tensor> {
    let rows = seqs.f_to_device(Device::Cpu)?;
    let (r, len) = rows.size2()?;
    let n = n as usize;
    let mut bans: Vec<(i64, i64)> = Vec::new();
    for i in 0..r {
        let row = Vec::<i64>::try_from(rows.f_get(i)?)?;
        let prefix = &row[len as usize + 1 - n..];
        for start in 0..=(row.len() - n) {
            if &row[start..start + n - 1] == prefix {
                bans.push((i, row[start + n - 1]));
            }
        }
    }
    if bans.is_empty() {
        return Ok(scores);
    }
    let (ri, ti): (Vec<i64>, Vec<i64>) = bans.into_iter().unzip();
    let device = scores.device();
    let ri = Tensor::f_from_slice(&ri)?.f_to_device(device)?;
    let ti = Tensor::f_from_slice(&ti)?.f_to_device(device)?;
    let mut scores = scores;
    let neg = Tensor::f_full([ri.size()[0]], f64::NEG_INFINITY, (Kind::Float, device))?;
    let _ = scores.f_index_put_(&[Some(ri), Some(ti)], &neg, false)?;
    Ok(scores)
}

/// What a `generate` call computed, for tests and diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerationStats {
    /// The decoder rows of each forward pass: the prompt's, then one entry per generated token. Rows whose
    /// caption ended (images whose beams are settled) leave the batch, so the numbers fall as captions end.
    pub rows_per_step: Vec<i64>,
}

/// transformers' `generate` for BLIP: token ids `[B * num_return_sequences, L]`.
pub fn generate(
    model: &BlipForConditionalGeneration,
    pixel_values: &Tensor,
    input_ids: Option<&Tensor>,
    attention_mask: Option<&Tensor>,
    config: &GenerationConfig,
) -> Result<Tensor> {
    Ok(generate_with_stats(model, pixel_values, input_ids, attention_mask, config)?.0)
}

/// [`generate`], also returning what it computed.
pub fn generate_with_stats(
    model: &BlipForConditionalGeneration,
    pixel_values: &Tensor,
    input_ids: Option<&Tensor>,
    attention_mask: Option<&Tensor>,
    config: &GenerationConfig,
) -> Result<(Tensor, GenerationStats)> {
    config.validate()?;
    let _guard = tch::no_grad_guard();
    let _kernels = crate::nn::few_rows::Enabled::new(); // decoding steps of a few rows: see few_rows.rs
    let tc = &model.config.text_config;
    let bos = config.bos_token_id.unwrap_or(tc.bos_token_id);
    // BLIP generates until [SEP] (transformers passes sep_token_id as the EOS) and pads with pad_token_id.
    let eos = Some(config.eos_token_id.unwrap_or(tc.sep_token_id));
    let pad = config.pad_token_id.unwrap_or(tc.pad_token_id);
    let pixel_values = model.check_pixel_values(pixel_values)?;
    let batch = pixel_values.size()[0];
    let prompts = prompts(model, batch, input_ids, attention_mask, bos)?;
    let prompt_len = prompts.width();
    let max_length = match (config.max_new_tokens, config.max_length) {
        (Some(m), _) => prompt_len + m,
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
    if let Some(seed) = config.seed {
        tch::manual_seed(seed);
    }
    let image = model.encode_images(&pixel_values)?;
    let processors = Processors {
        config,
        eos,
        prompt_len,
    };
    let mut stats = GenerationStats::default();
    if prompt_len >= max_length {
        let ids = prompts
            .ids
            .f_repeat_interleave_self_int(config.num_return_sequences, 0, None)?;
        return Ok((ids, stats));
    }
    let ids = if config.num_beams > 1 {
        beam_search(model, image, &prompts, max_length, &processors, pad, &mut stats)?
    } else {
        greedy_or_sample(model, image, &prompts, max_length, &processors, pad, &mut stats)?
    };
    release_freed_host_memory();
    Ok((ids, stats))
}

/// Hands the heap memory this call freed back to the OS. glibc keeps freed blocks under its mmap threshold
/// (which grows to 32 MB) in the process, so the call's image keys/values and activations (~330 MB at
/// batch 8 on real shapes) would otherwise stay resident after it returns. Costs ~1 ms.
fn release_freed_host_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// transformers' `_sample`: one token per step, argmax or a draw from the processed distribution. Rows whose
/// caption ended leave the batch (and the decoder), so they stop costing compute.
fn greedy_or_sample(
    model: &BlipForConditionalGeneration,
    image: Tensor,
    prompts: &Prompts,
    max_length: i64,
    processors: &Processors,
    pad: i64,
    stats: &mut GenerationStats,
) -> Result<Tensor> {
    let config = processors.config;
    let eos = processors.eos;
    let per_image = if config.do_sample {
        config.num_return_sequences
    } else {
        1
    };
    let (mut decoder, mut logits) = Decoder::prefill(model, image, prompts, per_image, max_length)?;
    let device = model.device();
    let rows = logits.size()[0];
    let width = prompts.width();
    let seqs = Tensor::f_full([rows, max_length], pad, (Kind::Int64, device))?;
    seqs.f_narrow(1, 0, width)?
        .f_copy_(&prompts.ids.f_repeat_interleave_self_int(per_image, 0, None)?)?;
    // Each row's own length, for ragged prompts; processors see the row's real tokens as transformers would.
    let lengths: Vec<i64> = prompts
        .lengths
        .iter()
        .flat_map(|&l| std::iter::repeat_n(l, per_image as usize))
        .collect();
    let ragged = prompts.ragged();
    let mut cur_len = width;
    // The rows still going, as places in `seqs`; on the device too once some rows left (`None`: all rows).
    let mut active: Vec<i64> = (0..rows).collect();
    let mut active_t: Option<Tensor> = None;
    loop {
        let scores = if ragged {
            // Rows differ in length only by their prompt: process each row with its own history.
            let mut out = Vec::with_capacity(active.len());
            for (at, &row) in active.iter().enumerate() {
                let l = lengths[row as usize];
                let hist = row_history(&seqs, row, l, width, cur_len)?;
                let sub = Processors {
                    config,
                    eos,
                    prompt_len: l,
                };
                out.push(sub.apply(&hist, logits.f_narrow(0, at as i64, 1)?, 1)?);
            }
            Tensor::f_cat(&out, 0)?
        } else {
            // Only the penalties read the tokens so far; the length rules need just their count.
            let history = match &active_t {
                Some(a) if processors.reads_history() => seqs.f_index_select(0, a)?,
                _ => seqs.f_narrow(0, 0, active.len() as i64)?,
            };
            processors.apply(&history.f_narrow(1, 0, cur_len)?, logits, 1)?
        };
        let next = if config.do_sample {
            draw(&scores.f_softmax(-1, Kind::Float)?, 1, active_t.as_ref(), rows)?.f_squeeze_dim(1)?
        } else {
            scores.f_argmax(-1, false)?
        };
        let mut column = seqs.f_narrow(1, cur_len, 1)?;
        match &active_t {
            Some(a) => {
                let _ = column.f_index_copy_(0, a, &next.f_unsqueeze(1)?)?;
            }
            None => {
                column.f_copy_(&next.f_unsqueeze(1)?)?;
            }
        }
        cur_len += 1;
        if cur_len >= max_length {
            break;
        }
        // The one host read of the step: which rows go on.
        let going: Vec<bool> = match eos {
            Some(eos) => Vec::<bool>::try_from(next.f_ne(eos)?.f_to_device(Device::Cpu)?)?,
            None => vec![true; active.len()],
        };
        let keep: Vec<i64> = (0..active.len() as i64).filter(|&i| going[i as usize]).collect();
        if keep.is_empty() {
            break;
        }
        let mut next = next;
        if keep.len() < active.len() {
            active = keep.iter().map(|&i| active[i as usize]).collect();
            let keep_t = Tensor::f_from_slice(&keep)?.f_to_device(device)?;
            next = next.f_index_select(0, &keep_t)?;
            active_t = Some(Tensor::f_from_slice(&active)?.f_to_device(device)?);
            decoder.keep_rows(&keep)?;
        }
        logits = decoder.step(&next)?;
    }
    stats.rows_per_step.append(&mut decoder.rows_per_step);
    let seqs = seqs.f_narrow(1, 0, cur_len)?;
    if ragged {
        return close_gaps(&seqs, &lengths, width, pad);
    }
    Ok(seqs)
}

/// `multinomial(probs, n)` for the rows `active` of a batch of `rows` (`None`: all of them), drawing exactly
/// what a draw over the whole batch would give these rows. transformers keeps drawing for rows that finished;
/// torch's `multinomial` (single draws and draws without replacement) takes one exponential variate per entry
/// whatever the probabilities, so filling the finished rows with stand-ins keeps the random stream, and the
/// tokens of a seed, the same as theirs.
fn draw(probs: &Tensor, n: i64, active: Option<&Tensor>, rows: i64) -> Result<Tensor> {
    let Some(active) = active else {
        return Ok(probs.f_multinomial(n, false)?);
    };
    let mut full = Tensor::f_ones([rows, probs.size()[1]], (probs.kind(), probs.device()))?;
    let _ = full.f_index_copy_(0, active, probs)?;
    Ok(full.f_multinomial(n, false)?.f_index_select(0, active)?)
}

/// A ragged row's tokens so far without the padding between its prompt and its new tokens: `[1, len]`.
fn row_history(seqs: &Tensor, row: i64, prompt: i64, width: i64, cur_len: i64) -> Result<Tensor> {
    let r = seqs.f_narrow(0, row, 1)?;
    Ok(Tensor::f_cat(
        &[r.f_narrow(1, 0, prompt)?, r.f_narrow(1, width, cur_len - width)?],
        1,
    )?)
}

/// Moves each ragged row's new tokens right after its prompt, padding at the end.
fn close_gaps(seqs: &Tensor, lengths: &[i64], width: i64, pad: i64) -> Result<Tensor> {
    let (rows, len) = seqs.size2()?;
    let out = Tensor::f_full([rows, len], pad, (Kind::Int64, seqs.device()))?;
    for (i, &l) in lengths.iter().enumerate() {
        let i = i as i64;
        let hist = row_history(seqs, i, l, width, len)?;
        out.f_narrow(0, i, 1)?
            .f_narrow(1, 0, hist.size()[1])?
            .f_copy_(&hist)?;
    }
    let longest = lengths.iter().map(|&l| l + len - width).max().unwrap_or(len);
    Ok(out.f_narrow(1, 0, longest)?)
}

/// transformers' vectorised `_beam_search` (and beam sampling), step for step, so the same beams win.
fn beam_search(
    model: &BlipForConditionalGeneration,
    image: Tensor,
    prompts: &Prompts,
    max_length: i64,
    processors: &Processors,
    pad: i64,
    stats: &mut GenerationStats,
) -> Result<Tensor> {
    let config = processors.config;
    let eos = processors.eos;
    if prompts.ragged() {
        // Beams of ragged prompts: decode each image alone (each row as if it were the only one).
        let mut outs = Vec::new();
        for (i, &l) in prompts.lengths.iter().enumerate() {
            let one = Prompts {
                ids: prompts.ids.f_narrow(0, i as i64, 1)?.f_narrow(1, 0, l)?,
                lengths: vec![l],
            };
            let sub = Processors {
                config,
                eos,
                prompt_len: l,
            };
            outs.push(beam_search(
                model,
                image.f_narrow(0, i as i64, 1)?,
                &one,
                max_length - prompts.width() + l,
                &sub,
                pad,
                stats,
            )?);
        }
        return pad_and_stack(&outs, pad);
    }
    let device = model.device();
    let beams = config.num_beams;
    let batch = prompts.ids.size()[0];
    let prompt_len = prompts.width();
    let (mut decoder, mut logits) = Decoder::prefill(model, image, prompts, beams, max_length)?;
    let vocab = logits.size()[1];
    let n_eos = i64::from(eos.is_some());
    let keep = 2.max(1 + n_eos) * beams;
    let min_tokens_to_keep = if config.do_sample { n_eos + 1 } else { 1 };
    let top_mask = Tensor::f_cat(
        &[
            Tensor::f_ones([beams], (Kind::Bool, device))?,
            Tensor::f_zeros([keep - beams], (Kind::Bool, device))?,
        ],
        0,
    )?;
    // transformers fills unused beam-search positions with `pad_token_id or eos_token_id`: a pad id of 0 is
    // falsy there, so BLIP's beam outputs are filled with [SEP].
    let fill = if pad != 0 { pad } else { eos.unwrap_or(-1) };
    let mut running = Tensor::f_full([batch, beams, max_length], fill, (Kind::Int64, device))?;
    running.f_narrow(2, 0, prompt_len)?.f_copy_(
        &prompts
            .ids
            .f_unsqueeze(1)?
            .f_expand([batch, beams, prompt_len], false)?,
    )?;
    let mut sequences = running.f_detach_copy()?;
    let mut running_scores = Tensor::f_zeros([batch, beams], (Kind::Float, device))?;
    let _ = running_scores.f_narrow(1, 1, beams - 1)?.f_fill_(-1e9)?;
    let mut beam_scores = Tensor::f_full([batch, beams], -1e9, (Kind::Float, device))?;
    let mut finished = Tensor::f_zeros([batch, beams], (Kind::Bool, device))?;
    let mut improvable = Tensor::f_ones([batch, 1], (Kind::Bool, device))?;
    let gen_cap = max_length - prompt_len;
    let mut running_idx = Tensor::f_full([batch, beams, gen_cap], -1, (Kind::Int64, device))?;
    let mut beam_idx = running_idx.f_detach_copy()?;
    let mut cur_len = prompt_len;
    let neg = |mask: &Tensor| -> Result<Tensor> { Ok(mask.f_to_kind(Kind::Float)?.f_mul_scalar(-1.0e9)?) };
    let gather = |t: &Tensor, idx: &Tensor| -> Result<Tensor> {
        let mut idx = idx.shallow_clone();
        while idx.dim() < t.dim() {
            idx = idx.f_unsqueeze(-1)?;
        }
        let mut shape = t.size();
        shape[1] = idx.size()[1];
        Ok(t.f_gather(1, &idx.f_expand(&shape, false)?, false)?)
    };
    // The images still going, as indices into the batch; on the device too once some were set aside.
    let mut active: Vec<i64> = (0..batch).collect();
    let mut active_t: Option<Tensor> = None;
    let nrs = config.num_return_sequences;
    // The returned rows of the images set aside: sequences `[batch, nrs, max_length]`, beam indices `[batch, nrs,
    // gen_cap]` (allocated when the first image is set aside).
    let mut done: Option<(Tensor, Tensor)> = None;
    loop {
        let n = active.len() as i64;
        let flat_running = running.f_narrow(2, 0, cur_len)?.f_reshape([n * beams, cur_len])?;
        let log_probs = logits.f_log_softmax(-1, Kind::Float)?;
        let log_probs = processors.apply(&flat_running, log_probs, min_tokens_to_keep)?;
        let log_probs = log_probs
            .f_view([n, beams, vocab])?
            .f_add(&running_scores.f_unsqueeze(2)?)?
            .f_reshape([n, beams * vocab])?;
        // The top `keep` continuations over all beams of each image.
        let (topk_scores, topk_indices) = if config.do_sample {
            let idx = draw(
                &log_probs.f_softmax(-1, Kind::Float)?,
                keep,
                active_t.as_ref(),
                batch,
            )?;
            (log_probs.f_gather(1, &idx, false)?, idx)
        } else {
            log_probs.f_topk(keep, -1, true, true)?
        };
        let source_beam = topk_indices.f_floor_divide_scalar(vocab)?;
        let token = topk_indices.f_remainder(vocab)?;
        let topk_running_idx = gather(&running_idx, &source_beam)?;
        let topk_running = gather(&running, &source_beam)?;
        topk_running
            .f_narrow(2, cur_len, 1)?
            .f_copy_(&token.f_unsqueeze(2)?)?;
        let batch_offset = Tensor::f_arange(n, (Kind::Int64, device))?
            .f_view([-1, 1])?
            .f_mul_scalar(beams)?;
        topk_running_idx
            .f_narrow(2, cur_len - prompt_len, 1)?
            .f_copy_(&source_beam.f_add(&batch_offset)?.f_unsqueeze(2)?)?;
        // A continuation stops when it emits EOS or reaches max_length.
        let mut hits = match eos {
            Some(e) => token.f_eq(e)?,
            None => Tensor::f_zeros([n, keep], (Kind::Bool, device))?,
        };
        if cur_len + 1 >= max_length {
            hits = Tensor::f_ones([n, keep], (Kind::Bool, device))?;
        }
        // The best `beams` unfinished continuations run on.
        let running_log = topk_scores.f_add(&neg(&hits)?)?;
        let (_, next_idx) = running_log.f_topk(beams, -1, true, true)?;
        running = gather(&topk_running, &next_idx)?;
        running_scores = gather(&running_log, &next_idx)?;
        running_idx = gather(&topk_running_idx, &next_idx)?;
        // Finished continuations among the top `beams` compete for the final places, length-penalised.
        let just_finished = hits.f_logical_and(&top_mask.f_unsqueeze(0)?)?;
        let mut fin_scores =
            topk_scores.f_div_scalar(((cur_len + 1 - prompt_len) as f64).powf(config.length_penalty))?;
        if config.early_stopping == EarlyStopping::True {
            fin_scores = fin_scores.f_add(&neg(&finished.f_all_dim(1, true)?)?)?;
        }
        fin_scores = fin_scores.f_add(&neg(&improvable.f_logical_not()?)?)?;
        fin_scores = fin_scores.f_add(&neg(&just_finished.f_logical_not()?)?)?;
        let merged_seq = Tensor::f_cat(&[&sequences, &topk_running], 1)?;
        let merged_scores = Tensor::f_cat(&[&beam_scores, &fin_scores], 1)?;
        let merged_idx = Tensor::f_cat(&[&beam_idx, &topk_running_idx], 1)?;
        let merged_fin = Tensor::f_cat(&[&finished, &just_finished], 1)?;
        let (_, best) = merged_scores.f_topk(beams, -1, true, true)?;
        sequences = gather(&merged_seq, &best)?;
        beam_scores = gather(&merged_scores, &best)?;
        beam_idx = gather(&merged_idx, &best)?;
        finished = gather(&merged_fin, &best)?;
        // Reorder the cache to the surviving beams, then extend it by their new tokens.
        let reorder = running_idx
            .f_select(2, cur_len - prompt_len)?
            .f_reshape([n * beams])?;
        cur_len += 1;
        if cur_len >= max_length {
            break;
        }
        // Can a running beam still beat the worst finished one?
        let hypothetical = if config.early_stopping == EarlyStopping::Never && config.length_penalty > 0.0 {
            (max_length - prompt_len) as f64
        } else {
            (cur_len - prompt_len) as f64
        };
        let best_running = running_scores
            .f_narrow(1, 0, 1)?
            .f_div_scalar(hypothetical.powf(config.length_penalty))?;
        let worst = beam_scores
            .f_amin([1i64].as_slice(), true)?
            .f_expand([n, beams], false)?
            .f_where_self(
                &finished,
                &Tensor::f_full([n, beams], -1.0e9, (Kind::Float, device))?,
            )?;
        improvable = improvable.f_logical_and(&best_running.f_gt_tensor(&worst)?.f_any_dim(1, true)?)?;
        // An image whose places all hold finished hypotheses and whose new finished scores get -1e9 (it cannot
        // improve, or early_stopping=True and it is full) can no longer change: it is set aside.
        let full = finished.f_all_dim(1, false)?;
        let settled = if config.early_stopping == EarlyStopping::True {
            full
        } else {
            full.f_logical_and(&improvable.f_squeeze_dim(1)?.f_logical_not()?)?
        };
        // The one host read of the step: the loop's conditions and the images settled.
        let flags = Vec::<bool>::try_from(
            Tensor::f_cat(
                &[
                    improvable.f_any()?.f_unsqueeze(0)?,
                    finished.f_all()?.f_unsqueeze(0)?,
                    hits.f_all()?.f_unsqueeze(0)?,
                    settled,
                ],
                0,
            )?
            .f_to_device(Device::Cpu)?,
        )?;
        let (improvement_possible, all_finished, all_hit) = (flags[0], flags[1], flags[2]);
        let open_beam = !(all_finished && config.early_stopping == EarlyStopping::True);
        let valid = !all_hit;
        if !(improvement_possible && open_beam && valid) {
            break;
        }
        let going: Vec<i64> = (0..n).filter(|&i| !flags[3 + i as usize]).collect();
        if going.is_empty() {
            break; // not reached: with every image settled the conditions above end the loop
        }
        if (going.len() as i64) < n {
            let settled: Vec<i64> = (0..n).filter(|&i| flags[3 + i as usize]).collect();
            set_aside(&mut done, &settled, &active, &sequences, &beam_idx, batch, nrs)?;
            let keep_t = Tensor::f_from_slice(&going)?.f_to_device(device)?;
            running = running.f_index_select(0, &keep_t)?;
            running_scores = running_scores.f_index_select(0, &keep_t)?;
            running_idx = running_idx.f_index_select(0, &keep_t)?;
            sequences = sequences.f_index_select(0, &keep_t)?;
            beam_scores = beam_scores.f_index_select(0, &keep_t)?;
            finished = finished.f_index_select(0, &keep_t)?;
            improvable = improvable.f_index_select(0, &keep_t)?;
            beam_idx = beam_idx.f_index_select(0, &keep_t)?;
            // The cache rows of the images going (beam `j` of image `i` is row `i * beams + j`), reordered.
            let rows = reorder
                .f_view([n, beams])?
                .f_index_select(0, &keep_t)?
                .f_reshape([-1])?;
            let row_image: Vec<i64> = going
                .iter()
                .flat_map(|&i| std::iter::repeat_n(i, beams as usize))
                .collect();
            decoder.select(&rows, &row_image)?;
            active = going.iter().map(|&i| active[i as usize]).collect();
            active_t = Some(Tensor::f_from_slice(&active)?.f_to_device(device)?);
        } else {
            decoder.reorder(&reorder)?;
        }
        let last = running
            .f_select(2, cur_len - 1)?
            .f_reshape([active.len() as i64 * beams])?;
        logits = decoder.step(&last)?;
    }
    stats.rows_per_step.append(&mut decoder.rows_per_step);
    if done.is_some() {
        let all: Vec<i64> = (0..active.len() as i64).collect();
        set_aside(&mut done, &all, &active, &sequences, &beam_idx, batch, nrs)?;
    }
    let (sequences, beam_idx) = match done {
        Some(pair) => pair,
        None => (sequences.f_narrow(1, 0, nrs)?, beam_idx.f_narrow(1, 0, nrs)?),
    };
    let sequences = sequences.f_reshape([batch * nrs, max_length])?;
    let beam_idx = beam_idx.f_reshape([batch * nrs, gen_cap])?;
    // The length is that of the longest returned hypothesis, over all images.
    let generated = i64::try_from(
        beam_idx
            .f_ne(-1)?
            .f_sum_dim_intlist(&[1i64][..], false, Kind::Int64)?
            .f_max()?,
    )?;
    Ok(sequences.f_narrow(1, 0, prompt_len + generated)?)
}

/// Copies the returned rows (the first `nrs` places) of the images at `positions` of the current state into
/// `done`, at their places in the batch (`active[position]`).
fn set_aside(
    done: &mut Option<(Tensor, Tensor)>,
    positions: &[i64],
    active: &[i64],
    sequences: &Tensor,
    beam_idx: &Tensor,
    batch: i64,
    nrs: i64,
) -> Result<()> {
    let device = sequences.device();
    if done.is_none() {
        let max_length = sequences.size()[2];
        let gen_cap = beam_idx.size()[2];
        *done = Some((
            Tensor::f_zeros([batch, nrs, max_length], (Kind::Int64, device))?,
            Tensor::f_zeros([batch, nrs, gen_cap], (Kind::Int64, device))?,
        ));
    }
    let Some((seq_out, idx_out)) = done.as_mut() else {
        return Ok(());
    };
    let from = Tensor::f_from_slice(positions)?.f_to_device(device)?;
    let places: Vec<i64> = positions.iter().map(|&p| active[p as usize]).collect();
    let to = Tensor::f_from_slice(&places)?.f_to_device(device)?;
    let _ = seq_out.f_index_copy_(0, &to, &sequences.f_index_select(0, &from)?.f_narrow(1, 0, nrs)?)?;
    let _ = idx_out.f_index_copy_(0, &to, &beam_idx.f_index_select(0, &from)?.f_narrow(1, 0, nrs)?)?;
    Ok(())
}

/// Stacks rows of different lengths, right-padded with `pad`.
fn pad_and_stack(parts: &[Tensor], pad: i64) -> Result<Tensor> {
    let longest = parts.iter().map(|p| p.size()[1]).max().unwrap_or(0);
    let padded = parts
        .iter()
        .map(|p| {
            let (r, l) = p.size2()?;
            if l == longest {
                return Ok(p.shallow_clone());
            }
            let fill = Tensor::f_full([r, longest - l], pad, (Kind::Int64, p.device()))?;
            Ok(Tensor::f_cat(&[p.shallow_clone(), fill], 1)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&padded, 0)?)
}
