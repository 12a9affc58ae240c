//! The logits processors transformers applies, in its order (repetition penalty, no-repeat n-grams, minimum
//! lengths, then for sampling temperature, top-k and top-p), kept apart from the loops that call them, and
//! the draw from the processed distribution.

use tch::{Device, Kind, Tensor};

use super::config::GenerationConfig;
use crate::error::Result;

/// The logits processors transformers applies, in its order.
pub(super) struct Processors<'a> {
    pub config: &'a GenerationConfig,
    pub eos: Option<i64>,
    /// The prompt's length (BOS included) of the rows processed: `min_new_tokens` counts from there.
    pub prompt_len: i64,
}

impl Processors<'_> {
    /// Whether any processor looks at the tokens generated so far (else the history need not be gathered).
    pub fn reads_history(&self) -> bool {
        self.config.repetition_penalty != 1.0 || self.config.no_repeat_ngram_size > 0
    }

    /// `scores` `[R, V]` for rows whose tokens so far are `seqs` `[R, cur_len]`.
    pub fn apply(&self, seqs: &Tensor, scores: Tensor, min_tokens_to_keep: i64) -> Result<Tensor> {
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
        // An EOS outside the vocabulary has no score to mask (transformers' processor finds it with `isin`).
        if let Some(eos) = self.eos.filter(|&e| e >= 0 && e < scores.size()[1]) {
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

/// `multinomial(probs, n)` for the rows `active` of a batch of `rows` (`None`: all of them), drawing exactly
/// what a draw over the whole batch would give these rows. transformers keeps drawing for rows that finished;
/// torch's `multinomial` (single draws and draws without replacement) takes one exponential variate per entry
/// whatever the probabilities, so filling the finished rows with stand-ins keeps the random stream, and the
/// tokens of a seed, the same as theirs.
pub(super) fn draw(probs: &Tensor, n: i64, active: Option<&Tensor>, rows: i64) -> Result<Tensor> {
    let Some(active) = active else {
        return Ok(probs.f_multinomial(n, false)?);
    };
    let mut full = Tensor::f_ones([rows, probs.size()[1]], (probs.kind(), probs.device()))?;
    let _ = full.f_index_copy_(0, active, probs)?;
    Ok(full.f_multinomial(n, false)?.f_index_select(0, active)?)
}
