//! `BlipForImageTextRetrieval`: BLIP's image-text retrieval head. The vision tower (as the captioner's), a
//! BERT text encoder (`text_encoder`, bidirectional, cross-attending to the image for matching), the two
//! projections of the contrastive space (`vision_proj`, `text_proj`) and the matching head (`itm_head`).
//!
//! Two scores, as transformers computes them: with `use_itm_head` the text is encoded over the image and
//! `itm_head` reads its `[CLS]` state (2 logits: no match, match); without, text and image are encoded apart
//! and their normalised projections give the cosine similarity of every image with every text. BLIP's
//! training losses (image-text contrastive with a learned temperature, image-text matching on hard
//! negatives mined from the contrastive similarities) are [`BlipForImageTextRetrieval::losses`].

use std::path::Path;

use tch::{Device, Kind, Reduction, Tensor};

use super::kv_cache::{number_images, CrossLayout};
use super::model::{check_pixel_values, check_range, is_index_kind, text_context};
use super::text::{BlipTextModel, TextInput};
use super::vision::{BlipVisionModel, Record, Recorded};
use crate::config::BlipConfig;
use crate::error::{Error, Result};
use crate::nn::saved::SavedModule;
use crate::nn::{ForwardContext, Linear, ParamSource};

/// The retrieval model.
#[derive(Debug)]
pub struct BlipForImageTextRetrieval {
    pub config: BlipConfig,
    pub vision_model: BlipVisionModel,
    pub text_encoder: BlipTextModel,
    pub vision_proj: Linear,
    pub text_proj: Linear,
    pub itm_head: Linear,
    pub training: bool,
    /// Where the checkpoint came from (`name_or_path` in transformers).
    pub name_or_path: String,
    /// The modules adapters train in full (LoRA's `modules_to_save`).
    pub saved_modules: Vec<SavedModule>,
}

crate::module!(BlipForImageTextRetrieval: "BlipForImageTextRetrieval" {
    children: [
        "vision_model" => vision_model,
        "text_encoder" => text_encoder,
        "vision_proj" => vision_proj,
        "text_proj" => text_proj,
        "itm_head" => itm_head,
    ],
});

super::head::blip_head!(BlipForImageTextRetrieval, kind: text_encoder);

/// What [`BlipForImageTextRetrieval::forward`] returns, with transformers' fields.
pub struct RetrievalOutput {
    /// `[B, 2]` matching logits (`use_itm_head`), or the `[images, texts]` cosine similarities.
    pub itm_score: Tensor,
    /// The vision tower's output `[B, 1 + patches, D]` (transformers' `last_hidden_state`).
    pub image_embeds: Tensor,
    /// The text encoder's last hidden state `[B, T, D]` (transformers' `question_embeds`).
    pub question_embeds: Tensor,
    /// The vision tower's hidden states / attentions when asked for.
    pub recorded: Recorded,
}

/// BLIP's two retrieval losses for one batch of pairs, and the negatives the matching loss drew.
pub struct RetrievalLosses {
    /// Image-text contrastive loss: the mean of the image-to-text and text-to-image cross-entropies over the
    /// batch's similarities divided by the temperature (pairs of the same image count as positives).
    pub itc: Tensor,
    /// Image-text matching loss: cross-entropy of `itm_head` over the B positive pairs and 2B hard negatives.
    pub itm: Tensor,
    /// The temperature after clamping to [0.001, 0.5] (the trained parameter itself).
    pub temp: Tensor,
    /// For each text, the index of the negative image drawn for it (`[B]`).
    pub negative_images: Tensor,
    /// For each image, the index of the negative text drawn for it (`[B]`).
    pub negative_texts: Tensor,
    /// The sampling weights of those draws (softmax of the similarities / temp, the row's positives zeroed):
    /// `[B, B]` text-to-image and image-to-text.
    pub weights_t2i: Tensor,
    pub weights_i2t: Tensor,
}

/// The smallest and largest temperature BLIP lets the contrastive loss use.
pub const TEMP_MIN: f64 = 0.001;
pub const TEMP_MAX: f64 = 0.5;
/// BLIP's initial temperature.
pub const TEMP_INIT: f64 = 0.07;

/// `F.normalize(x, dim=-1)`: `x / max(‖x‖₂, 1e-12)` over the last dimension.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(x.f_div(&norm.f_expand_as(x)?)?)
}

impl BlipForImageTextRetrieval {
    /// Builds the model, taking every parameter from `src`.
    pub fn build(config: BlipConfig, src: &mut dyn ParamSource) -> Result<Self> {
        let vision_model = BlipVisionModel::load(src, "vision_model", &config.vision_config)?;
        let tc = &config.text_config;
        let text_encoder = BlipTextModel::load(src, "text_encoder", tc)?;
        let width = config.image_text_hidden_size();
        if width < 1 {
            return Err(Error::config(format!(
                "image_text_hidden_size must be a positive width, got {width}"
            )));
        }
        let std = tc.initializer_range;
        let vision_proj = Linear::load(src, "vision_proj", config.vision_config.hidden_size, width, std)?;
        let text_proj = Linear::load(src, "text_proj", tc.hidden_size, width, std)?;
        let itm_head = Linear::load(src, "itm_head", tc.hidden_size, 2, std)?;
        Ok(Self {
            config,
            vision_model,
            text_encoder,
            vision_proj,
            text_proj,
            itm_head,
            training: false,
            name_or_path: String::new(),
            saved_modules: Vec::new(),
        })
    }

    /// Loads a transformers folder of `BlipForImageTextRetrieval` (`config.json` + safetensors), the
    /// folder's `config.json` replaced by `config` when given.
    pub fn from_pretrained_with(
        dir: &Path,
        config: Option<BlipConfig>,
        kind: Option<Kind>,
        device: Device,
    ) -> Result<Self> {
        Self::load_folder(dir, config, kind, device, |files| {
            if !files.names().any(|n| n.starts_with("text_encoder.")) {
                let hint = if files.names().any(|n| n.starts_with("text_decoder.")) {
                    " (it holds a caption decoder: load it with BlipForConditionalGeneration)"
                } else {
                    ""
                };
                return Err(Error::invalid(format!(
                    "{} holds no text_encoder weights, so it is not a BlipForImageTextRetrieval checkpoint{hint}",
                    dir.display()
                )));
            }
            Ok(())
        })
    }

    /// Gives the text encoder's word embeddings the rows `weight` (`[V', D]`: transformers'
    /// `resize_token_embeddings`, which resizes the input embeddings only, this head having no LM head);
    /// `text_config.vocab_size` becomes `V'`. Refused once adapters copy modules.
    pub fn resize_vocab(&mut self, weight: &Tensor) -> Result<()> {
        let v = super::head::resized_rows(&self.config, weight, "word embeddings")?;
        super::head::check_no_adapters(&self.saved_modules, false)?;
        super::head::resize_embedding(&mut self.text_encoder.embeddings.word_embeddings, weight)?;
        self.config.text_config.vocab_size = v;
        Ok(())
    }

    // ------------------------------------------------------------------------------------------ inputs

    /// Checks `pixel_values` and brings them to the model's device and kind.
    pub fn check_pixel_values(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        check_pixel_values(&self.vision_model, &self.config, pixel_values, cx)
    }

    /// Checks `input_ids` `[B, T]` (and `attention_mask` of the same shape) and brings them to the device.
    pub fn check_text(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if input_ids.dim() != 2 {
            return Err(Error::invalid(format!(
                "input_ids must have shape [batch, sequence], got {:?}",
                input_ids.size()
            )));
        }
        if !is_index_kind(input_ids.kind()) {
            return Err(Error::type_error(format!(
                "input_ids must hold integer token ids (torch.long), got {:?}",
                input_ids.kind()
            )));
        }
        let (b, t) = input_ids.size2()?;
        if b < 1 {
            return Err(Error::invalid(
                "input_ids holds no texts (batch size 0); pass at least one text",
            ));
        }
        if t < 1 {
            return Err(Error::invalid("input_ids must hold at least one token"));
        }
        let max_pos = self.config.text_config.max_position_embeddings;
        if t > max_pos {
            return Err(Error::invalid(format!(
                "input_ids has {t} tokens but the model has only {max_pos} positions \
                 (text_config.max_position_embeddings); truncate the texts"
            )));
        }
        let device = self.device();
        let ids = input_ids.f_to_device(device)?.f_to_kind(Kind::Int64)?;
        check_range(&ids, 0, self.config.text_config.vocab_size, "input_ids")?;
        let mask = match attention_mask {
            None => None,
            Some(m) => {
                if m.size() != [b, t] {
                    return Err(Error::invalid(format!(
                        "attention_mask has shape {:?} but input_ids has {:?}; they must match",
                        m.size(),
                        [b, t]
                    )));
                }
                if !is_index_kind(m.kind()) && m.kind() != Kind::Bool && !crate::nn::is_float_kind(m.kind()) {
                    return Err(Error::type_error("attention_mask must hold 0/1 values"));
                }
                Some(m.f_to_device(device)?)
            }
        };
        Ok((ids, mask))
    }

    // ----------------------------------------------------------------------------------------- forward

    /// Image embeddings `[B, 1 + patches, D]` of checked pixels.
    pub fn encode_images(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        self.vision_model.forward(pixel_values, cx)
    }

    /// The text encoder's last hidden state for checked `ids`: bidirectional self-attention over `mask`'s
    /// tokens, cross-attending to `image` (`[B, N, Dv]`, every image token attended) when given.
    pub fn encode_text(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        image: Option<&Tensor>,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        self.text_encoder.encode(
            TextInput::Ids(ids),
            mask,
            image.map(|states| (states, None)),
            &text_context(cx),
        )
    }

    /// The normalised contrastive features `[B, image_text_hidden_size]` of image embeddings.
    pub fn image_features(&self, image_embeds: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let cls = image_embeds.f_select(1, 0)?;
        normalize(&self.vision_proj.forward_t(&cls, cx)?)
    }

    /// The normalised contrastive features of text encodings (their `[CLS]` state).
    pub fn text_features(&self, text_hidden: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let cls = text_hidden.f_select(1, 0)?;
        normalize(&self.text_proj.forward_t(&cls, cx)?)
    }

    /// The matching logits `[B, 2]` of checked texts over their images' embeddings (row by row).
    pub fn itm_logits(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        image_embeds: &Tensor,
        cx: &ForwardContext,
    ) -> Result<(Tensor, Tensor)> {
        let hidden = self.encode_text(ids, mask, Some(image_embeds), cx)?;
        let logits = self.itm_head.forward_t(&hidden.f_select(1, 0)?, cx)?;
        Ok((logits, hidden))
    }

    /// [`Self::itm_logits`] of text rows over fewer images: row `r` is matched with image `row_image[r]` of
    /// `images` (`[images, N, Dv]`), each image's cross-attention keys/values computed once for all its rows
    /// rather than once per row (ITM re-ranking scores each image's k candidate texts: k times fewer key and
    /// value projections over the image tokens). Training, or adapters chosen row by row, expand the images
    /// to one per row instead (the shared path has no attention dropout and one adapter per image). Returns
    /// the logits `[B, 2]` in the rows' order.
    pub fn itm_logits_over_images(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        images: &Tensor,
        row_image: &[i64],
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let rows = ids.size()[0];
        let count = images.size()[0];
        if row_image.len() as i64 != rows {
            return Err(Error::invalid(format!(
                "image_index has {} entries but there are {rows} texts; give one image index per text",
                row_image.len()
            )));
        }
        if let Some(&bad) = row_image.iter().find(|&&i| i < 0 || i >= count) {
            return Err(Error::invalid(format!(
                "image_index holds {bad}, outside the {count} images of image_embeds (0..{count})"
            )));
        }
        let device = ids.device();
        let index =
            |v: &[i64], on: Device| -> Result<Tensor> { Ok(Tensor::f_from_slice(v)?.f_to_device(on)?) };
        if cx.train || cx.adapters.is_some() || cx.image_adapters.is_some() {
            let per_row = images.f_index_select(0, &index(row_image, images.device())?)?;
            return Ok(self.itm_logits(ids, mask, &per_row, cx)?.0);
        }
        // Rows sorted by image (stable), the images they use numbered 0.. in that order.
        let mut order: Vec<i64> = (0..rows).collect();
        order.sort_by_key(|&r| row_image[r as usize]);
        let sorted: Vec<i64> = order.iter().map(|&r| row_image[r as usize]).collect();
        let (used, sorted_image) = number_images(&sorted);
        let order_t = index(&order, device)?;
        let ids = ids.f_index_select(0, &order_t)?;
        let mask = mask.map(|m| m.f_index_select(0, &order_t)).transpose()?;
        let images = if used.len() as i64 == count {
            images.shallow_clone()
        } else {
            images.f_index_select(0, &index(&used, images.device())?)?
        };
        let layout = CrossLayout::of_rows(&sorted_image, device)?;
        let hidden = self.text_encoder.encode_over_shared_images(
            TextInput::Ids(&ids),
            mask.as_ref(),
            &images,
            &layout,
            &text_context(cx),
        )?;
        let logits = self.itm_head.forward_t(&hidden.f_select(1, 0)?, cx)?;
        // Back to the rows' order.
        let mut inverse = vec![0i64; order.len()];
        for (at, &r) in order.iter().enumerate() {
            inverse[r as usize] = at as i64;
        }
        Ok(logits.f_index_select(0, &index(&inverse, device)?)?)
    }

    /// transformers' `BlipForImageTextRetrieval.forward`: with `use_itm_head` the `[B, 2]` matching logits of
    /// each text with its image (equal batches), otherwise the `[images, texts]` cosine similarities.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        use_itm_head: bool,
        record: Record,
        cx: &ForwardContext,
    ) -> Result<RetrievalOutput> {
        let pixel_values = self.check_pixel_values(pixel_values, cx)?;
        let (ids, mask) = self.check_text(input_ids, attention_mask)?;
        let images = pixel_values.size()[0];
        let texts = ids.size()[0];
        if use_itm_head && images != texts {
            return Err(Error::invalid(format!(
                "input_ids has batch size {texts} but pixel_values has {images}; with use_itm_head=True each \
                 text is matched with its own image, so they must match (use_itm_head=False scores every \
                 image against every text)"
            )));
        }
        let (image_embeds, recorded) = if record == Record::default() {
            (self.encode_images(&pixel_values, cx)?, Recorded::default())
        } else {
            self.vision_model.forward_recording(&pixel_values, cx, record)?
        };
        let (itm_score, question_embeds) = if use_itm_head {
            self.itm_logits(&ids, mask.as_ref(), &image_embeds, cx)?
        } else {
            let hidden = self.encode_text(&ids, mask.as_ref(), None, cx)?;
            let image_feat = self.image_features(&image_embeds, cx)?;
            let text_feat = self.text_features(&hidden, cx)?;
            (image_feat.f_matmul(&text_feat.f_tr()?)?, hidden)
        };
        Ok(RetrievalOutput {
            itm_score,
            image_embeds,
            question_embeds,
            recorded,
        })
    }

    // ------------------------------------------------------------------------------------------ losses

    /// BLIP's retrieval losses for a batch of B (image, text) pairs, as LAVIS's `BlipRetrieval` computes
    /// them without its momentum encoder and queue:
    ///
    /// - ITC: `sim = image_feat @ text_featᵀ / temp` (and its transpose for text-to-image), the targets the
    ///   row's positives (pairs with the same `image_ids`, each pair alone without them) spread evenly; the
    ///   mean of the two soft cross-entropies.
    /// - ITM: for each text a negative image, for each image a negative text, drawn from the softmax of the
    ///   same similarities with the row's positives zeroed (hard negatives: the more similar, the likelier);
    ///   `itm_head`'s cross-entropy over the B positives (label 1) and the 2B negatives (label 0).
    ///
    /// `temp` (a 0-dim float tensor, the trained parameter) is clamped in place to [0.001, 0.5] first, as
    /// LAVIS does. The draws take libtorch's global generator (`seed` reseeds it first when given).
    #[allow(clippy::too_many_arguments)]
    pub fn losses(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        image_ids: Option<&Tensor>,
        temp: &Tensor,
        seed: Option<i64>,
        cx: &ForwardContext,
    ) -> Result<RetrievalLosses> {
        let pixel_values = self.check_pixel_values(pixel_values, cx)?;
        let b = pixel_values.size()[0];
        let (ids, _) = self.check_text(input_ids, attention_mask)?;
        if ids.size()[0] != b {
            return Err(Error::invalid(format!(
                "input_ids has batch size {} but pixel_values has {b}; the losses take pairs (text i \
                 describes image i)",
                ids.size()[0]
            )));
        }
        let image_embeds = self.encode_images(&pixel_values, cx)?;
        self.losses_over_images(
            &image_embeds,
            input_ids,
            attention_mask,
            image_ids,
            temp,
            seed,
            cx,
        )
    }

    /// [`Self::losses`] over image embeddings already computed (`[B, 1 + patches, D]`, from the vision tower
    /// or the trainer's feature cache).
    #[allow(clippy::too_many_arguments)]
    pub fn losses_over_images(
        &self,
        image_embeds: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        image_ids: Option<&Tensor>,
        temp: &Tensor,
        seed: Option<i64>,
        cx: &ForwardContext,
    ) -> Result<RetrievalLosses> {
        let (ids, mask) = self.check_text(input_ids, attention_mask)?;
        let b = image_embeds.size()[0];
        if ids.size()[0] != b {
            return Err(Error::invalid(format!(
                "input_ids has batch size {} but the images have {b}; the losses take pairs (text i \
                 describes image i)",
                ids.size()[0]
            )));
        }
        if b < 2 {
            return Err(Error::invalid(
                "the retrieval losses need at least 2 pairs in a batch (the other pairs are the negatives)",
            ));
        }
        let device = self.device();
        let image_ids = match image_ids {
            None => Tensor::f_arange(b, (Kind::Int64, device))?,
            Some(t) => {
                if t.size() != [b] || !is_index_kind(t.kind()) {
                    return Err(Error::invalid(format!(
                        "image_ids must be a 1-D integer tensor with one id per pair ([{b}]), got {:?} {:?}",
                        t.kind(),
                        t.size()
                    )));
                }
                t.f_to_device(device)?.f_to_kind(Kind::Int64)?
            }
        };
        if temp.dim() != 0 || !crate::nn::is_float_kind(temp.kind()) {
            return Err(Error::invalid(format!(
                "temp must be a 0-dim floating-point tensor (the learned temperature), got {:?} {:?}",
                temp.kind(),
                temp.size()
            )));
        }
        {
            let _guard = tch::no_grad_guard();
            let mut t = temp.shallow_clone();
            let _ = t.f_clamp_(TEMP_MIN, TEMP_MAX)?;
        }
        let temp_d = temp.f_to_device(device)?.f_to_kind(Kind::Float)?;

        let text_hidden = self.encode_text(&ids, mask.as_ref(), None, cx)?;
        let image_feat = self.image_features(image_embeds, cx)?.f_to_kind(Kind::Float)?;
        let text_feat = self.text_features(&text_hidden, cx)?.f_to_kind(Kind::Float)?;

        // Image-text contrastive.
        let positives = image_ids
            .f_unsqueeze(1)?
            .f_eq_tensor(&image_ids.f_unsqueeze(0)?)?; // [B, B]
        let pos_f = positives.f_to_kind(Kind::Float)?;
        let targets = pos_f.f_div(&pos_f.f_sum_dim_intlist([1i64].as_slice(), true, Kind::Float)?)?;
        let sim_i2t = image_feat.f_matmul(&text_feat.f_tr()?)?.f_div(&temp_d)?;
        let sim_t2i = text_feat.f_matmul(&image_feat.f_tr()?)?.f_div(&temp_d)?;
        let soft_ce = |sim: &Tensor| -> Result<Tensor> {
            Ok(sim
                .f_log_softmax(1, Kind::Float)?
                .f_mul(&targets)?
                .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?
                .f_mean(Kind::Float)?
                .f_neg()?)
        };
        let itc = soft_ce(&sim_i2t)?.f_add(&soft_ce(&sim_t2i)?)?.f_div_scalar(2.0)?;

        // Hard negatives, drawn without a graph.
        let (weights_i2t, weights_t2i, negative_images, negative_texts) = {
            let _guard = tch::no_grad_guard();
            let weights = |sim: &Tensor| -> Result<Tensor> {
                Ok(sim
                    .f_detach()?
                    .f_softmax(1, Kind::Float)?
                    .f_masked_fill(&positives, 0.0)?)
            };
            let w_i2t = weights(&sim_i2t)?;
            let w_t2i = weights(&sim_t2i)?;
            let empty = w_t2i
                .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?
                .f_le(0.0)?
                .f_any()?;
            if bool::try_from(empty)? {
                return Err(Error::invalid(
                    "a pair in this batch has no negative to draw (every pair shows the same image, or the \
                     similarities underflowed); a retrieval batch needs pairs of at least 2 different images",
                ));
            }
            if let Some(seed) = seed {
                tch::manual_seed(seed);
            }
            let neg_images = w_t2i.f_multinomial(1, false)?.f_squeeze_dim(1)?;
            let neg_texts = w_i2t.f_multinomial(1, false)?.f_squeeze_dim(1)?;
            (w_i2t, w_t2i, neg_images, neg_texts)
        };

        // Image-text matching: positives, (text, negative image), (negative text, image).
        let image_neg = image_embeds.f_index_select(0, &negative_images)?;
        let ids_neg = ids.f_index_select(0, &negative_texts)?;
        let ids_all = Tensor::f_cat(&[&ids, &ids, &ids_neg], 0)?;
        let mask_all = match &mask {
            Some(m) => {
                let m_neg = m.f_index_select(0, &negative_texts)?;
                Some(Tensor::f_cat(&[m, m, &m_neg], 0)?)
            }
            None => None,
        };
        let images_all = Tensor::f_cat(&[image_embeds, &image_neg, image_embeds], 0)?;
        let (logits, _) = self.itm_logits(&ids_all, mask_all.as_ref(), &images_all, cx)?;
        let labels = Tensor::f_cat(
            &[
                Tensor::f_ones([b], (Kind::Int64, device))?,
                Tensor::f_zeros([2 * b], (Kind::Int64, device))?,
            ],
            0,
        )?;
        let itm = logits.f_to_kind(Kind::Float)?.f_cross_entropy_loss::<Tensor>(
            &labels,
            None,
            Reduction::Mean,
            -100,
            0.0,
        )?;
        Ok(RetrievalLosses {
            itc,
            itm,
            temp: temp.shallow_clone(),
            negative_images,
            negative_texts,
            weights_t2i,
            weights_i2t,
        })
    }

    // ------------------------------------------------------------------------------------------ output

    /// Writes a folder transformers' `BlipForImageTextRetrieval` loads: `config.json`, `model.safetensors`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let arch = Some("BlipForImageTextRetrieval");
        super::head::save_folder(dir, &self.named_parameters(), &self.config, self.kind(), arch)
    }
}
