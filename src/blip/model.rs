//! `BlipForConditionalGeneration`: loading, the training/scoring forward pass with its loss, the
//! parameter walk, device/dtype moves and saving.

use std::path::Path;

use tch::{Device, Kind, Reduction, Tensor};

use super::text::{BlipTextLmHeadModel, CrossProjections, DecoderMasks};
use super::vision::{BlipVisionModel, Record, Recorded};
use crate::config::BlipConfig;
use crate::error::{Error, Result};
use crate::nn::attention::causal_padding_mask;
use crate::nn::{ForwardContext, ParamSource};
use crate::weights::SafetensorsFiles;

/// Inputs of one forward pass, as the caller gave them (validated by [`BlipForConditionalGeneration::forward`]).
pub struct ForwardInputs<'a> {
    pub pixel_values: &'a Tensor,
    pub input_ids: &'a Tensor,
    pub attention_mask: Option<&'a Tensor>,
    pub labels: Option<&'a Tensor>,
}

/// What a forward pass returns: the loss when labels were given, the logits, and the image embeddings; and
/// what it was asked to record of the vision tower (transformers returns the vision tower's `hidden_states`
/// and `attentions`).
pub struct BlipOutput {
    pub loss: Option<Tensor>,
    pub logits: Tensor,
    pub image_embeds: Tensor,
    pub recorded: Recorded,
}

/// The options of a forward beyond its inputs, as transformers' `forward` keywords: what to record, the
/// attention path, how many final positions get logits, and labels already aligned with the logits.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    pub record: Record,
    /// `logits_to_keep`: 0 computes every position's logits, `k` only the last `k`'s.
    pub logits_to_keep: i64,
    /// `shift_labels`: targets already aligned with the logits (no shift), `[B, kept positions]`.
    pub shift_labels: Option<&'a Tensor>,
}

/// The whole captioning model.
#[derive(Debug)]
pub struct BlipForConditionalGeneration {
    pub config: BlipConfig,
    pub vision_model: BlipVisionModel,
    pub text_decoder: BlipTextLmHeadModel,
    pub training: bool,
    /// Where the checkpoint came from (`name_or_path` in transformers); written into adapter configs.
    pub name_or_path: String,
    /// The modules adapters train in full (LoRA's `modules_to_save`), with their originals and copies.
    pub saved_modules: Vec<crate::nn::saved::SavedModule>,
}

crate::module!(BlipForConditionalGeneration: "BlipForConditionalGeneration" {
    children: ["vision_model" => vision_model, "text_decoder" => text_decoder],
});

super::head::blip_head!(BlipForConditionalGeneration, kind: text_decoder);

/// The decoder layers' dropout seeds start here (the vision layers' at the step's seed itself).
const TEXT_SEED_OFFSET: i64 = 0x5bd1_e995;

/// The decoder's context for a forward under `cx`: its own dropout seeds.
pub(crate) fn text_context<'a>(cx: &ForwardContext<'a>) -> ForwardContext<'a> {
    cx.with_seed_offset(TEXT_SEED_OFFSET)
}

impl BlipForConditionalGeneration {
    /// Builds the model, taking every parameter from `src`.
    pub fn build(config: BlipConfig, src: &mut dyn ParamSource) -> Result<Self> {
        let vision_model = BlipVisionModel::load(src, "vision_model", &config.vision_config)?;
        let text_decoder = BlipTextLmHeadModel::load(
            src,
            "text_decoder",
            &config.text_config,
            config.tie_word_embeddings(),
        )?;
        Ok(Self {
            config,
            vision_model,
            text_decoder,
            training: false,
            name_or_path: String::new(),
            saved_modules: Vec::new(),
        })
    }

    /// Loads a transformers checkpoint folder (`config.json` + safetensors weights).
    pub fn from_pretrained(dir: &Path, kind: Option<Kind>, device: Device) -> Result<Self> {
        Self::from_pretrained_with(dir, None, kind, device)
    }

    /// [`Self::from_pretrained`] with the folder's weights read under `config` when given (transformers'
    /// `from_pretrained(path, config=...)`) instead of the folder's `config.json`.
    pub fn from_pretrained_with(
        dir: &Path,
        config: Option<BlipConfig>,
        kind: Option<Kind>,
        device: Device,
    ) -> Result<Self> {
        Self::load_folder(dir, config, kind, device, |_| Ok(()))
    }

    /// Gives the vocabulary new sizes (transformers' `resize_token_embeddings`): the word embeddings take
    /// `weight` (`[V', D]`) and the LM head's bias `bias` (`[V']`), an untied decoder `decoder` (its weight
    /// and bias); the parameters keep their identity (their data is replaced, as transformers does), and
    /// `text_config.vocab_size` becomes `V'`. Refused once adapters wrap the head or copies of modules exist.
    pub fn resize_vocab(
        &mut self,
        weight: &Tensor,
        bias: &Tensor,
        decoder: Option<(&Tensor, &Tensor)>,
    ) -> Result<()> {
        let v = super::head::resized_rows(&self.config, weight, "word embeddings")?;
        super::head::check_lm_head_resize(&self.text_decoder, &self.saved_modules, v, bias, decoder)?;
        super::head::resize_lm_head(&mut self.text_decoder, weight, bias, decoder)?;
        self.config.text_config.vocab_size = v;
        Ok(())
    }

    /// Image embeddings `[B, 1 + patches, D]` (after the vision tower's final LayerNorm).
    pub fn encode_images(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        self.vision_model.forward(pixel_values, cx)
    }

    /// Checks the inputs of [`Self::forward`] and brings them to the model's device and index type.
    fn prepare(
        &self,
        inputs: &ForwardInputs,
        cx: &ForwardContext,
    ) -> Result<(Tensor, Tensor, Option<Tensor>, Option<Tensor>)> {
        let device = self.device();
        let pixel_values = self.check_pixel_values(inputs.pixel_values, cx)?;
        let batch = pixel_values.size()[0];
        let ids = inputs.input_ids;
        if ids.dim() != 2 {
            return Err(Error::invalid(format!(
                "input_ids must have shape [batch, sequence], got {:?}",
                ids.size()
            )));
        }
        if !is_index_kind(ids.kind()) {
            return Err(Error::type_error(format!(
                "input_ids must hold integer token ids (torch.long), got {:?}",
                ids.kind()
            )));
        }
        let (b, t) = ids.size2()?;
        if b != batch {
            return Err(Error::invalid(format!(
                "input_ids has batch size {b} but pixel_values has {batch}; they must match"
            )));
        }
        if t < 1 {
            return Err(Error::invalid("input_ids must hold at least one token"));
        }
        let max_pos = self.config.text_config.max_position_embeddings;
        if t > max_pos {
            return Err(Error::invalid(format!(
                "input_ids has {t} tokens but the model has only {max_pos} positions \
                 (text_config.max_position_embeddings); truncate the captions"
            )));
        }
        let ids = ids.f_to_device(device)?.f_to_kind(Kind::Int64)?;
        let vocab = self.config.text_config.vocab_size;
        check_range(&ids, 0, vocab, "input_ids")?;
        let mask = match inputs.attention_mask {
            None => None,
            Some(m) => {
                if m.size() != [b, t] {
                    return Err(Error::invalid(format!(
                        "attention_mask has shape {:?} but input_ids has {:?}; they must match",
                        m.size(),
                        [b, t]
                    )));
                }
                if m.kind() == Kind::ComplexFloat {
                    return Err(Error::type_error("attention_mask must hold 0/1 values"));
                }
                Some(m.f_to_device(device)?)
            }
        };
        let labels = match inputs.labels {
            None => None,
            Some(l) => {
                if l.size() != [b, t] {
                    return Err(Error::invalid(format!(
                        "labels has shape {:?} but input_ids has {:?}; they must match",
                        l.size(),
                        [b, t]
                    )));
                }
                if !is_index_kind(l.kind()) {
                    return Err(Error::type_error(format!(
                        "labels must hold integer token ids (torch.long, -100 to ignore), got {:?}",
                        l.kind()
                    )));
                }
                let l = l.f_to_device(device)?.f_to_kind(Kind::Int64)?;
                let allowed = l
                    .f_ge(0)?
                    .f_logical_and(&l.f_lt(vocab)?)?
                    .f_logical_or(&l.f_eq(-100)?)?;
                if !bool::try_from(allowed.f_all()?)? {
                    return Err(Error::invalid(format!(
                        "labels must be token ids in [0, {vocab}) or -100 (ignored)"
                    )));
                }
                Some(l)
            }
        };
        Ok((pixel_values, ids, mask, labels))
    }

    /// Checks `pixel_values` (`[B, C, H, W]`, floating point, the configured image size unless `cx` allows
    /// another resolution: `interpolate_pos_encoding`, then any size of at least one patch) and moves it to
    /// the model's device and kind.
    pub fn check_pixel_values(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        check_pixel_values(&self.vision_model, &self.config, pixel_values, cx)
    }

    /// The forward pass transformers' `BlipForConditionalGeneration.forward` computes: logits of every
    /// position, and (with labels) the mean cross-entropy of each position's prediction of the next label.
    /// It runs as `model.training` says (dropout on in training mode), like torch's `module(...)`.
    pub fn forward(&self, inputs: &ForwardInputs) -> Result<BlipOutput> {
        self.forward_with(inputs, &ForwardContext::mode(self.training))
    }

    /// [`Self::forward`] under a context its caller chose (a loop that drives the model).
    pub fn forward_with(&self, inputs: &ForwardInputs, cx: &ForwardContext) -> Result<BlipOutput> {
        let (pixel_values, ids, mask, labels) = self.prepare(inputs, cx)?;
        let image_embeds = self.encode_images(&pixel_values, cx)?;
        let (logits, loss) =
            self.decode_with_loss(&ids, mask.as_ref(), &image_embeds, None, labels.as_ref(), cx)?;
        Ok(BlipOutput {
            loss,
            logits,
            image_embeds,
            recorded: Recorded::default(),
        })
    }

    /// [`Self::forward_with`] with transformers' further `forward` keywords ([`ForwardOptions`]).
    pub fn forward_options(
        &self,
        inputs: &ForwardInputs,
        cx: &ForwardContext,
        options: &ForwardOptions,
    ) -> Result<BlipOutput> {
        let plain = options.logits_to_keep == 0 && options.shift_labels.is_none();
        if plain && options.record == Record::default() {
            return self.forward_with(inputs, cx);
        }
        let (pixel_values, ids, mask, labels) = self.prepare(inputs, cx)?;
        if options.logits_to_keep < 0 {
            return Err(Error::invalid(format!(
                "logits_to_keep must be 0 (every position) or a positive number of final positions, got {}",
                options.logits_to_keep
            )));
        }
        let (image_embeds, recorded) =
            self.vision_model
                .forward_recording(&pixel_values, cx, options.record)?;
        let t = ids.size()[1];
        let text_cx = text_context(cx);
        let hidden = self.decoder_hidden(&ids, mask.as_ref(), &image_embeds, None, cx)?;
        let keep = match options.logits_to_keep {
            0 => t,
            k => k.min(t),
        };
        let hidden = hidden.f_narrow(1, t - keep, keep)?;
        let logits = self.text_decoder.logits(&hidden, &text_cx)?;
        // As in transformers, a loss needs `labels`; `shift_labels` then replaces their shifted copy.
        let loss = match (&labels, options.shift_labels) {
            (Some(_), Some(shift)) => Some(self.aligned_loss(&logits, shift)?),
            (Some(labels), None) => {
                if keep != t {
                    return Err(Error::invalid(format!(
                        "labels score every position, but logits_to_keep={} keeps {keep} of {t}; pass \
                         logits_to_keep=0 with labels (or shift_labels aligned with the kept logits)",
                        options.logits_to_keep
                    )));
                }
                Some(self.caption_loss(&logits, labels, cx)?)
            }
            (None, _) => None,
        };
        Ok(BlipOutput {
            loss,
            logits,
            image_embeds,
            recorded,
        })
    }

    /// Mean cross-entropy of `logits` `[B, T, V]` against `targets` `[B, T]` already aligned with them
    /// (transformers' `shift_labels`), ignoring -100, in float32 with the configured label smoothing.
    fn aligned_loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.size3()?;
        if targets.size() != [b, t] {
            return Err(Error::invalid(format!(
                "shift_labels has shape {:?} but the logits have {:?}; shift_labels must be aligned with the \
                 (kept) logits",
                targets.size(),
                [b, t]
            )));
        }
        if !is_index_kind(targets.kind()) {
            return Err(Error::type_error(format!(
                "shift_labels must hold integer token ids (torch.long, -100 to ignore), got {:?}",
                targets.kind()
            )));
        }
        let targets = targets.f_to_device(logits.device())?.f_to_kind(Kind::Int64)?;
        let allowed = targets
            .f_ge(0)?
            .f_logical_and(&targets.f_lt(v)?)?
            .f_logical_or(&targets.f_eq(-100)?)?;
        if !bool::try_from(allowed.f_all()?)? {
            return Err(Error::invalid(format!(
                "shift_labels must be token ids in [0, {v}) or -100 (ignored)"
            )));
        }
        Ok(logits
            .f_reshape([b * t, v])?
            .f_to_kind(Kind::Float)?
            .f_cross_entropy_loss::<Tensor>(
                &targets.f_reshape([b * t])?,
                None,
                Reduction::Mean,
                -100,
                self.config.text_config.label_smoothing,
            )?)
    }

    /// Decoder logits for `ids` over `image_embeds` and, with `labels`, the shifted cross-entropy.
    /// Inputs must already be on the model's device (the training loop calls this directly).
    pub fn decode_with_loss(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        image_embeds: &Tensor,
        projected: Option<&CrossProjections>,
        labels: Option<&Tensor>,
        cx: &ForwardContext,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let text_cx = text_context(cx);
        let hidden = self.decoder_hidden(ids, mask, image_embeds, projected, cx)?;
        let logits = self.text_decoder.logits(&hidden, &text_cx)?;
        let loss = match labels {
            Some(labels) => Some(self.caption_loss(&logits, labels, cx)?),
            None => None,
        };
        Ok((logits, loss))
    }

    /// The training loss of `ids` (scored against `labels`, shifted) over `image_embeds` (with their
    /// cross-attention projections when given): [`Self::decode_with_loss`]'s loss without its logits, the LM
    /// head run only over the positions that score a token ([`Self::scored_caption_loss`]).
    pub fn decode_loss(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        image_embeds: &Tensor,
        projected: Option<&CrossProjections>,
        labels: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let hidden = self.decoder_hidden(ids, mask, image_embeds, projected, cx)?;
        self.scored_caption_loss(&hidden, labels, cx)
    }

    /// [`Self::caption_loss`] of the logits of the decoder's `hidden` states `[B, T, C]`, with the LM head
    /// run only over the rows that score a token: every position but the last, and on the CPU only those
    /// whose next label is not -100 (padding). The full logits' path slices `[B, T-1, V]` out of `[B, T, V]`
    /// (a copy) and zero-fills `[B, T, V]` for its gradient: 2-5% of a text-only LoRA step at batch 4, more
    /// where captions are padded. Equal to the full path's loss up to the GEMMs' rounding. On CUDA all
    /// `B·(T-1)` rows stay (choosing rows there would wait on the device every step).
    pub fn scored_caption_loss(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let (b, t, c) = hidden.size3()?;
        if cx.adapters.is_some() {
            // A mixed-adapter batch picks each row's adapter by its sequence: its rows stay as they are.
            let logits = self.text_decoder.logits(hidden, &text_context(cx))?;
            return self.caption_loss(&logits, labels, cx);
        }
        let mut rows = hidden.f_narrow(1, 0, t - 1)?.f_reshape([b * (t - 1), c])?;
        let mut targets = labels.f_narrow(1, 1, t - 1)?.f_reshape([b * (t - 1)])?;
        if hidden.device() == Device::Cpu {
            let index = targets.f_ne(-100)?.f_nonzero()?;
            let n = index.size()[0];
            // None scored: the mean over no rows stays the full path's NaN.
            if n > 0 && n < b * (t - 1) {
                let index = index.f_reshape([n])?;
                rows = rows.f_index_select(0, &index)?;
                targets = targets.f_index_select(0, &index)?;
            }
        }
        let logits = self.text_decoder.logits(&rows, &text_context(cx))?;
        self.token_loss(&logits, &targets, cx)
    }

    /// The decoder's cross-attention base projections of `image_embeds` under `cx`
    /// ([`BlipTextLmHeadModel::cross_projections`]): what [`Self::decode_with_loss`] can be given instead of
    /// computing them; None when they train.
    pub fn cross_projections(
        &self,
        image_embeds: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Option<CrossProjections>> {
        self.text_decoder
            .cross_projections(image_embeds, &text_context(cx))
    }

    /// The decoder's hidden states for `ids` (causal, with `mask`'s padding) over `image_embeds` (with their
    /// cross-attention projections when given), under `cx`.
    fn decoder_hidden(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        image_embeds: &Tensor,
        projected: Option<&CrossProjections>,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let t = ids.size()[1];
        let additive = match mask {
            Some(m) => Some(causal_padding_mask(m, t, self.text_decoder.compute_kind(cx))?),
            None => None,
        };
        let masks = DecoderMasks {
            self_mask: additive.as_ref(),
            causal: additive.is_none(),
        };
        self.text_decoder
            .hidden_states(ids, image_embeds, projected, &masks, &text_context(cx))
    }

    /// Mean cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` (ignoring -100), in float32, with
    /// `cx`'s label smoothing, else the configured one.
    pub fn caption_loss(&self, logits: &Tensor, labels: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let (b, t, v) = logits.size3()?;
        let shifted = logits.f_narrow(1, 0, t - 1)?.f_reshape([b * (t - 1), v])?;
        let targets = labels.f_narrow(1, 1, t - 1)?.f_reshape([b * (t - 1)])?;
        self.token_loss(&shifted, &targets, cx)
    }

    /// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (ignoring -100), in float32, with `cx`'s
    /// label smoothing, else the configured one.
    fn token_loss(&self, logits: &Tensor, targets: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        Ok(logits.f_to_kind(Kind::Float)?.f_cross_entropy_loss::<Tensor>(
            targets,
            None,
            Reduction::Mean,
            -100,
            cx.label_smoothing
                .unwrap_or(self.config.text_config.label_smoothing),
        )?)
    }

    /// Writes a checkpoint folder transformers loads: `config.json` and `model.safetensors`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        super::head::save_folder(dir, &self.named_parameters(), &self.config, self.kind(), None)
    }
}

/// [`BlipForConditionalGeneration::check_pixel_values`] for any head over `vision` (configured by `config`).
pub(crate) fn check_pixel_values(
    vision: &BlipVisionModel,
    config: &BlipConfig,
    pixel_values: &Tensor,
    cx: &ForwardContext,
) -> Result<Tensor> {
    let vc = &config.vision_config;
    let size = pixel_values.size();
    if size.len() != 4 {
        return Err(Error::invalid(format!(
            "pixel_values must have shape [batch, {}, {}, {}], got {size:?}",
            vc.num_channels, vc.image_size, vc.image_size
        )));
    }
    if !crate::nn::is_float_kind(pixel_values.kind()) {
        return Err(Error::type_error(format!(
            "pixel_values must be a floating-point tensor (the processor's output), got {:?}",
            pixel_values.kind()
        )));
    }
    if size[0] < 1 {
        return Err(Error::invalid(format!(
            "pixel_values holds no images (batch size 0, shape {size:?}); pass at least one image"
        )));
    }
    if size[1] != vc.num_channels {
        return Err(Error::invalid(format!(
            "pixel_values must have shape [batch, {}, height, width], got {size:?}",
            vc.num_channels
        )));
    }
    if cx.interpolate_pos_encoding {
        if size[2] < vc.patch_size || size[3] < vc.patch_size {
            return Err(Error::invalid(format!(
                "pixel_values of shape {size:?} is smaller than one {p}x{p} patch \
                 (vision_config.patch_size); images must be at least {p} pixels high and wide",
                p = vc.patch_size
            )));
        }
    } else if size[2] != vc.image_size || size[3] != vc.image_size {
        return Err(Error::invalid(format!(
            "pixel_values must have shape [batch, {}, {}, {}], got {size:?}; resize images with the \
             model's processor, or pass interpolate_pos_encoding=True to run the model at another \
             resolution",
            vc.num_channels, vc.image_size, vc.image_size
        )));
    }
    Ok(pixel_values
        .f_to_device(vision.embeddings.patch_embedding.weight.device())?
        .f_to_kind(vision.kind())?)
}

pub(crate) fn is_index_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    )
}

/// Fails unless every value of `t` is in `[lo, hi)`. One host read of two scalars.
pub(crate) fn check_range(t: &Tensor, lo: i64, hi: i64, what: &str) -> Result<()> {
    if t.numel() == 0 {
        return Ok(());
    }
    let min = i64::try_from(t.f_min()?)?;
    let max = i64::try_from(t.f_max()?)?;
    if min < lo || max >= hi {
        return Err(Error::invalid(format!(
            "{what} must be token ids in [{lo}, {hi}), found values from {min} to {max}"
        )));
    }
    Ok(())
}

/// The kind the checkpoint's floating tensors are stored in: transformers 5 loads in the stored
/// precision when no `dtype` is given (its default `dtype="auto"`).
pub(crate) fn stored_kind(files: &SafetensorsFiles) -> Result<Kind> {
    for name in files.names() {
        if let Some(kind) = files.kind(name)? {
            if crate::nn::is_float_kind(kind) {
                return Ok(kind);
            }
        }
    }
    Ok(Kind::Float)
}

/// The torch name of a kind (`"float32"`, `"bfloat16"`, ...).
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        _ => "float32",
    }
}
