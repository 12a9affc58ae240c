//! The decoder driver every strategy steps: the prompts' prefill, one token per row and step into the
//! preallocated self-attention cache, rows leaving (captions that ended) or reordered (beams), and the
//! padding mask of ragged prompts.

use tch::{Kind, Tensor};

use super::prompt::Prompts;
use crate::blip::kv_cache::DecoderCache;
use crate::blip::text::BlipTextLmHeadModel;
use crate::blip::text::DecoderMasks;
use crate::error::Result;
use crate::nn::attention::finfo_min;
use crate::nn::{AdapterRows, ForwardContext};

/// Every decoding step runs as inference, with the decoding kernel for its few rows.
const DECODING: ForwardContext = ForwardContext::DECODING;

/// Everything one decoding run shares: the image keys/values, the cache, positions and the padding mask.
pub(super) struct Decoder<'a> {
    model: &'a BlipTextLmHeadModel,
    image: Tensor,
    /// A mixed-adapter batch: the adapter of each image still decoded, and of each row (its image's). They
    /// follow the cache as rows leave and images drop; beams reorder only within an image, so keep them.
    image_adapters: Option<AdapterRows>,
    row_adapters: Option<AdapterRows>,
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
    pub fn prefill(
        model: &'a BlipTextLmHeadModel,
        image: Tensor,
        image_adapters: Option<AdapterRows>,
        prompts: &Prompts,
        per_image: i64,
        max_len: i64,
    ) -> Result<(Self, Tensor)> {
        let device = model.bert.embeddings.word_embeddings.weight.device();
        let ids = prompts.ids.f_repeat_interleave_self_int(per_image, 0, None)?;
        let rows = ids.size()[0];
        let width = prompts.width();
        let lengths = prompts.row_lengths(per_image);
        let mut cache = model.new_cache(rows, per_image, max_len)?;
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
                model.kind(),
            )?),
            None => None,
        };
        let masks = DecoderMasks {
            self_mask: additive.as_ref(),
            causal: additive.is_none(),
        };
        let row_adapters = image_adapters.as_ref().map(|a| a.repeat_each(per_image as usize));
        let cx = DECODING.with_adapters(row_adapters.as_ref(), image_adapters.as_ref());
        let hidden = model.decode_step(&ids, &positions, &image, &masks, &mut cache, &cx)?;
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
            .logits(&last, &cx)?
            .f_squeeze_dim(1)?
            .f_to_kind(Kind::Float)?;
        let next_pos = lengths_t;
        let mut decoder = Self {
            model,
            image,
            image_adapters,
            row_adapters,
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
    pub fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        let slot = self.cache.len;
        let additive = match &mut self.key_mask {
            Some(km) => {
                let _ = km.f_narrow(1, slot, 1)?.f_fill_(1)?;
                let visible = km.f_narrow(1, 0, slot + 1)?;
                let kind = self.model.kind();
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
        let cx = DECODING.with_adapters(self.row_adapters.as_ref(), self.image_adapters.as_ref());
        let hidden = self.model.decode_step(
            &tokens.f_unsqueeze(1)?,
            &positions,
            &self.image,
            &masks,
            &mut self.cache,
            &cx,
        )?;
        self.next_pos = self.next_pos.f_add_scalar(1)?;
        Ok(self
            .model
            .logits(&hidden, &cx)?
            .f_squeeze_dim(1)?
            .f_to_kind(Kind::Float)?)
    }

    /// Keeps the rows `rows` (old row indices, which may also reorder beams), new row `r` belonging to the old
    /// image `row_image[r]` (ascending): the other rows finished, and images without rows drop their keys/values.
    pub fn select(&mut self, rows: &Tensor, row_image: &[i64]) -> Result<()> {
        if let Some(images) = self.cache.select_rows(rows, row_image)? {
            self.image = self.image.f_index_select(0, &images)?;
        }
        if let Some(adapters) = &self.image_adapters {
            let mut kept = row_image.to_vec();
            kept.dedup();
            let images = adapters.select(&kept);
            self.row_adapters = Some(images.select(self.cache.row_image()));
            self.image_adapters = Some(images);
        }
        if let Some(km) = &self.key_mask {
            self.key_mask = Some(km.f_index_select(0, rows)?);
        }
        self.next_pos = self.next_pos.f_index_select(0, rows)?;
        Ok(())
    }

    /// Keeps the rows at positions `keep` (ascending; the other rows finished).
    pub fn keep_rows(&mut self, keep: &[i64]) -> Result<()> {
        let row_image: Vec<i64> = keep.iter().map(|&r| self.cache.row_image()[r as usize]).collect();
        let rows = Tensor::f_from_slice(keep)?.f_to_device(self.next_pos.device())?;
        self.select(&rows, &row_image)
    }

    pub fn reorder(&mut self, index: &Tensor) -> Result<()> {
        self.cache.reorder(index)?;
        if let Some(km) = &self.key_mask {
            self.key_mask = Some(km.f_index_select(0, index)?);
        }
        self.next_pos = self.next_pos.f_index_select(0, index)?;
        Ok(())
    }

    /// Adds the rows of each forward pass to `stats`.
    pub fn finish(mut self, stats: &mut GenerationStats) {
        stats.rows_per_step.append(&mut self.rows_per_step);
    }
}

/// What a `generate` call computed, for tests and diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerationStats {
    /// The decoder rows of each forward pass: the prompt's, then one entry per generated token. Rows whose
    /// caption ended (images whose beams are settled) leave the batch, so the numbers fall as captions end.
    pub rows_per_step: Vec<i64>,
}
