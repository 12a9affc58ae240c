//! Caption (and VQA answer) generation with transformers' semantics: greedy, sampling and beam search over the BLIP decoder,
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
//!
//! The rooms: `config` (settings and their checks), `job` (what every strategy starts from: settings
//! resolved against the model, prompts, image embeddings), `prompt` (the token layout), `driver` (the
//! decoder and its cache, stepped by every strategy), `logits` (the logits processors and the draw),
//! `sample` (greedy and sampling), `beam` (beam search and beam sampling).

mod beam;
mod config;
mod driver;
mod job;
mod logits;
mod prompt;
mod sample;

use tch::Tensor;

pub use config::{EarlyStopping, GenerationConfig};
pub use driver::GenerationStats;

use crate::blip::{BlipForConditionalGeneration, BlipForQuestionAnswering};
use crate::error::Result;

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
    generate_with_adapters(model, pixel_values, input_ids, attention_mask, None, config)
}

/// [`generate_with_stats`] over a mixed-adapter batch when `adapter_names` is given (peft's
/// `generate(adapter_names=[...])`): image `i` and every row decoded from it (its beams, its returned
/// sequences) run adapter `adapter_names[i]` (`"__base__"`: the base model), in both towers.
pub fn generate_with_adapters(
    model: &BlipForConditionalGeneration,
    pixel_values: &Tensor,
    input_ids: Option<&Tensor>,
    attention_mask: Option<&Tensor>,
    adapter_names: Option<&[String]>,
    config: &GenerationConfig,
) -> Result<(Tensor, GenerationStats)> {
    let _guard = tch::no_grad_guard();
    let job = job::Job::prepare(
        model,
        pixel_values,
        input_ids,
        attention_mask,
        adapter_names,
        config,
    )?;
    run(job, config)
}

/// transformers' `BlipForQuestionAnswering.generate`: answer token ids `[B * num_return_sequences, L]`
/// (`[BOS, answer..., SEP, pad...]`) for the questions `question` (`[B, Tq]`, padding mask `attention_mask`)
/// about the images, decoded by the same strategies over the question encoding.
/// `adapter_names`: one adapter per image (a mixed-adapter batch, `"__base__"` for the base model) in the
/// three towers; its rows and beams inherit it.
pub fn generate_answers(
    model: &BlipForQuestionAnswering,
    pixel_values: &Tensor,
    question: &Tensor,
    attention_mask: Option<&Tensor>,
    adapter_names: Option<&[String]>,
    config: &GenerationConfig,
) -> Result<(Tensor, GenerationStats)> {
    let _guard = tch::no_grad_guard();
    let job = job::Job::prepare_answers(
        model,
        pixel_values,
        question,
        attention_mask,
        adapter_names,
        config,
    )?;
    run(job, config)
}

/// Runs a prepared job with the strategy its settings choose.
fn run(job: job::Job, config: &GenerationConfig) -> Result<(Tensor, GenerationStats)> {
    let mut stats = GenerationStats::default();
    if !job.has_room() {
        return Ok((job.prompts_only()?, stats));
    }
    let ids = if config.num_beams > 1 {
        beam::search(job, &mut stats)?
    } else {
        sample::greedy_or_sample(job, &mut stats)?
    };
    crate::freed_memory::give_back();
    Ok((ids, stats))
}
