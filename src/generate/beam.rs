//! Beam search and beam sampling: transformers' vectorised `_beam_search`, step for step, with images whose
//! beams are settled set aside.

use tch::{Device, Kind, Tensor};

use super::config::EarlyStopping;
use super::driver::GenerationStats;
use super::job::Job;
use super::logits::draw;
use super::prompt::pad_and_stack;
use crate::error::Result;

/// transformers' vectorised `_beam_search` (and beam sampling), step for step, so the same beams win.
pub(super) fn search(mut job: Job, stats: &mut GenerationStats) -> Result<Tensor> {
    let config = job.config;
    let eos = job.eos;
    let (max_length, pad) = (job.max_length, job.pad);
    if job.prompts.ragged() {
        // Beams of ragged prompts: decode each image alone (each row as if it were the only one).
        let mut outs = Vec::new();
        for i in 0..job.prompts.lengths.len() {
            outs.push(search(job.alone(i)?, stats)?);
        }
        return pad_and_stack(&outs, pad);
    }
    let device = job.device;
    let beams = config.num_beams;
    let batch = job.prompts.ids.size()[0];
    let prompt_len = job.prompts.width();
    let processors = job.processors(prompt_len);
    let (mut decoder, mut logits) = job.start(beams)?;
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
    let mut running = job
        .prompts
        .layout(beams, max_length, fill)?
        .f_view([batch, beams, max_length])?;
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
    decoder.finish(stats);
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
