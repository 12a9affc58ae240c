//! Greedy decoding and sampling (transformers' `_sample`), one token per row and step.

use tch::{Device, Kind, Tensor};

use super::driver::GenerationStats;
use super::job::Job;
use super::logits::draw;
use super::prompt::{close_gaps, row_history};
use crate::error::Result;

/// transformers' `_sample`: one token per step, argmax or a draw from the processed distribution. Rows whose
/// caption ended leave the batch (and the decoder), so they stop costing compute.
pub(super) fn greedy_or_sample(mut job: Job, stats: &mut GenerationStats) -> Result<Tensor> {
    let config = job.config;
    let eos = job.eos;
    let (max_length, pad) = (job.max_length, job.pad);
    let per_image = if config.do_sample {
        config.num_return_sequences
    } else {
        1
    };
    let (mut decoder, mut logits) = job.start(per_image)?;
    let device = job.device;
    let rows = logits.size()[0];
    let prompts = &job.prompts;
    let width = prompts.width();
    let seqs = prompts.layout(per_image, max_length, pad)?;
    // Each row's own length, for ragged prompts; processors see the row's real tokens as transformers would.
    let lengths = prompts.row_lengths(per_image);
    let processors = job.processors(width);
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
                out.push(
                    job.processors(l)
                        .apply(&hist, logits.f_narrow(0, at as i64, 1)?, 1)?,
                );
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
    decoder.finish(stats);
    let seqs = seqs.f_narrow(1, 0, cur_len)?;
    if ragged {
        return close_gaps(&seqs, &lengths, width, pad);
    }
    Ok(seqs)
}
