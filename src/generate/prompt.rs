//! The token layout: prompts as BLIP's `generate` prepares them (BOS, then the prompt minus its last
//! token), the `[rows, max_length]` buffers the strategies write into, and the helpers for prompts of
//! different lengths (ragged rows).

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// A batch of prompts: `[B, P]` ids, left-aligned per row (`lengths[i]` real tokens, the rest padding).
pub(super) struct Prompts {
    pub ids: Tensor,
    pub lengths: Vec<i64>,
}

impl Prompts {
    pub fn width(&self) -> i64 {
        self.lengths.iter().copied().max().unwrap_or(1)
    }

    pub fn ragged(&self) -> bool {
        self.lengths.iter().any(|&l| l != self.width())
    }

    /// Each row's prompt length, the prompts repeated `per_image` times each.
    pub fn row_lengths(&self, per_image: i64) -> Vec<i64> {
        self.lengths
            .iter()
            .flat_map(|&l| std::iter::repeat_n(l, per_image as usize))
            .collect()
    }

    /// The token buffer `[B * per_image, max_length]`: each prompt `per_image` times, then `fill`.
    pub fn layout(&self, per_image: i64, max_length: i64, fill: i64) -> Result<Tensor> {
        let rows = self.ids.size()[0] * per_image;
        let seqs = Tensor::f_full([rows, max_length], fill, (Kind::Int64, self.ids.device()))?;
        seqs.f_narrow(1, 0, self.width())?
            .f_copy_(&self.ids.f_repeat_interleave_self_int(per_image, 0, None)?)?;
        Ok(seqs)
    }
}

/// Builds the per-row prompts BLIP's `generate` decodes from: BOS, then the prompt minus its last token.
pub(super) fn prompts(
    device: Device,
    vocab: i64,
    batch: i64,
    input_ids: Option<&Tensor>,
    attention_mask: Option<&Tensor>,
    bos: i64,
) -> Result<Prompts> {
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

/// A ragged row's tokens so far without the padding between its prompt and its new tokens: `[1, len]`.
pub(super) fn row_history(seqs: &Tensor, row: i64, prompt: i64, width: i64, cur_len: i64) -> Result<Tensor> {
    let r = seqs.f_narrow(0, row, 1)?;
    Ok(Tensor::f_cat(
        &[r.f_narrow(1, 0, prompt)?, r.f_narrow(1, width, cur_len - width)?],
        1,
    )?)
}

/// Moves each ragged row's new tokens right after its prompt, padding at the end.
pub(super) fn close_gaps(seqs: &Tensor, lengths: &[i64], width: i64, pad: i64) -> Result<Tensor> {
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

/// Stacks rows of different lengths, right-padded with `pad`.
pub(super) fn pad_and_stack(parts: &[Tensor], pad: i64) -> Result<Tensor> {
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
