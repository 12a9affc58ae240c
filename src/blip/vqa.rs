//! `BlipForQuestionAnswering`: the image encoder, the question encoder (`text_encoder`: bidirectional,
//! cross-attending to the image) and the answer decoder (`text_decoder`: causal, cross-attending to the
//! question encoding); loading, the forward pass with its loss, the parameter walk, moves and saving. Names
//! are transformers' state-dict keys.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::model::{check_pixel_values, check_range, is_index_kind, text_context};
use super::text::{BlipTextLmHeadModel, BlipTextModel, CrossStates, DecoderMasks, TextInput};
use super::vision::BlipVisionModel;
use crate::config::BlipConfig;
use crate::error::{Error, Result};
use crate::nn::attention::causal_padding_mask;
use crate::nn::{ForwardContext, ParamSource};

/// Inputs of one forward pass, with transformers' names (validated by [`BlipForQuestionAnswering::forward`]).
pub struct VqaInputs<'a> {
    /// The question `[B, Tq]`.
    pub input_ids: &'a Tensor,
    pub pixel_values: &'a Tensor,
    /// The question's padding mask `[B, Tq]`.
    pub attention_mask: Option<&'a Tensor>,
    /// The answer fed to the decoder `[B, Ta]` (the labels when not given).
    pub decoder_input_ids: Option<&'a Tensor>,
    pub decoder_attention_mask: Option<&'a Tensor>,
    /// The answer ids the loss scores (`labels[:, 1:]` from positions `:-1`; -100 ignored).
    pub labels: Option<&'a Tensor>,
}

/// What a forward pass returns: transformers' `loss` and `image_embeds` (= `last_hidden_state`), and what it
/// computes on the way without returning (the question encoding and the answer decoder's logits).
pub struct VqaOutput {
    pub loss: Option<Tensor>,
    pub image_embeds: Tensor,
    pub question_embeds: Tensor,
    pub logits: Tensor,
}

/// The visual-question-answering model.
#[derive(Debug)]
pub struct BlipForQuestionAnswering {
    pub config: BlipConfig,
    pub vision_model: BlipVisionModel,
    pub text_encoder: BlipTextModel,
    pub text_decoder: BlipTextLmHeadModel,
    pub training: bool,
    /// Where the checkpoint came from (`name_or_path` in transformers).
    pub name_or_path: String,
    /// The modules adapters train in full (LoRA's `modules_to_save`).
    pub saved_modules: Vec<crate::nn::saved::SavedModule>,
}

crate::module!(BlipForQuestionAnswering: "BlipForQuestionAnswering" {
    children: [
        "vision_model" => vision_model,
        "text_encoder" => text_encoder,
        "text_decoder" => text_decoder,
    ],
});

super::head::blip_head!(BlipForQuestionAnswering, kind: text_decoder);

/// The question encoder's layers' dropout seeds start here (the decoder's at `text_context`'s offset).
const ENCODER_SEED_OFFSET: i64 = 0x2545_f491;

impl BlipForQuestionAnswering {
    /// Builds the model, taking every parameter from `src` (in transformers' registration order).
    pub fn build(config: BlipConfig, src: &mut dyn ParamSource) -> Result<Self> {
        let vision_model = BlipVisionModel::load(src, "vision_model", &config.vision_config)?;
        let text_encoder = BlipTextModel::load(src, "text_encoder", &config.text_config)?;
        let text_decoder = BlipTextLmHeadModel::load(
            src,
            "text_decoder",
            &config.text_config,
            config.tie_word_embeddings(),
        )?;
        Ok(Self {
            config,
            vision_model,
            text_encoder,
            text_decoder,
            training: false,
            name_or_path: String::new(),
            saved_modules: Vec::new(),
        })
    }

    /// Loads a transformers `BlipForQuestionAnswering` folder (`config.json` + safetensors weights), under
    /// `config` instead of the folder's `config.json` when given.
    pub fn from_pretrained(
        dir: &Path,
        config: Option<BlipConfig>,
        kind: Option<Kind>,
        device: Device,
    ) -> Result<Self> {
        Self::load_folder(dir, config, kind, device, |_| Ok(()))
    }

    /// Gives the vocabulary new sizes (see `BlipForConditionalGeneration::resize_vocab`): the question
    /// encoder's word embeddings take `encoder_weight` (`[V', D]`, transformers' input embeddings), the answer
    /// decoder's `weight`, its LM head's bias `bias` and an untied head `decoder`; `text_config.vocab_size`
    /// becomes `V'`. Refused once adapters exist.
    pub fn resize_vocab(
        &mut self,
        encoder_weight: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        decoder: Option<(&Tensor, &Tensor)>,
    ) -> Result<()> {
        let v =
            super::head::resized_rows(&self.config, encoder_weight, "question encoder's word embeddings")?;
        let dv = super::head::resized_rows(&self.config, weight, "answer decoder's word embeddings")?;
        if dv != v {
            return Err(Error::invalid(format!(
                "the two resized word-embedding tables must have the same number of rows, got {v} and {dv}"
            )));
        }
        super::head::check_lm_head_resize(&self.text_decoder, &self.saved_modules, v, bias, decoder)?;
        super::head::resize_embedding(&mut self.text_encoder.embeddings.word_embeddings, encoder_weight)?;
        super::head::resize_lm_head(&mut self.text_decoder, weight, bias, decoder)?;
        self.config.text_config.vocab_size = v;
        Ok(())
    }

    /// Whether the answer decoder's LM head is the decoder's word embeddings.
    pub fn lm_head_tied(&self) -> bool {
        self.text_decoder.cls.predictions.decoder.tied
    }

    /// Image embeddings `[B, 1 + patches, D]`.
    pub fn encode_images(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        self.vision_model.forward(pixel_values, cx)
    }

    /// The question encoding `[B, Tq, D]`: the text encoder over `question` (with its padding `mask`),
    /// cross-attending to every image position.
    pub fn encode_questions(
        &self,
        question: &Tensor,
        mask: Option<&Tensor>,
        image_embeds: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        self.text_encoder.encode(
            TextInput::Ids(question),
            mask,
            Some((image_embeds, None)),
            &cx.with_seed_offset(ENCODER_SEED_OFFSET),
        )
    }

    /// Checks `pixel_values` and moves them to the model's device and kind.
    pub fn check_pixel_values(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        check_pixel_values(&self.vision_model, &self.config, pixel_values, cx)
    }

    /// `ids` (`name`) as token ids `[batch, ≤ positions]` on the model's device.
    pub(crate) fn check_ids(&self, ids: &Tensor, name: &str, batch: i64) -> Result<Tensor> {
        if ids.dim() != 2 {
            return Err(Error::invalid(format!(
                "{name} must have shape [batch, sequence], got {:?}",
                ids.size()
            )));
        }
        if !is_index_kind(ids.kind()) {
            return Err(Error::type_error(format!(
                "{name} must hold integer token ids (torch.long), got {:?}",
                ids.kind()
            )));
        }
        let (b, t) = ids.size2()?;
        if b != batch {
            return Err(Error::invalid(format!(
                "{name} has batch size {b} but pixel_values has {batch}; they must match"
            )));
        }
        if t < 1 {
            return Err(Error::invalid(format!("{name} must hold at least one token")));
        }
        let max_pos = self.config.text_config.max_position_embeddings;
        if t > max_pos {
            return Err(Error::invalid(format!(
                "{name} has {t} tokens but the model has only {max_pos} positions \
                 (text_config.max_position_embeddings); truncate it"
            )));
        }
        let ids = ids.f_to_device(self.device())?.f_to_kind(Kind::Int64)?;
        check_range(&ids, 0, self.config.text_config.vocab_size, name)?;
        Ok(ids)
    }

    /// A padding mask `name` of `shape` on the model's device.
    pub(crate) fn check_mask(
        &self,
        mask: Option<&Tensor>,
        name: &str,
        of: &str,
        shape: &[i64],
    ) -> Result<Option<Tensor>> {
        let Some(m) = mask else { return Ok(None) };
        if m.size() != shape {
            return Err(Error::invalid(format!(
                "{name} has shape {:?} but {of} has {shape:?}; they must match",
                m.size()
            )));
        }
        if !is_index_kind(m.kind()) && !crate::nn::is_float_kind(m.kind()) && m.kind() != Kind::Bool {
            return Err(Error::type_error(format!("{name} must hold 0/1 values")));
        }
        Ok(Some(m.f_to_device(self.device())?))
    }

    /// transformers' `BlipForQuestionAnswering.forward`, run as `model.training` says.
    pub fn forward(&self, inputs: &VqaInputs) -> Result<VqaOutput> {
        self.forward_with(inputs, &ForwardContext::mode(self.training))
    }

    /// transformers' `BlipForQuestionAnswering.forward` under a context its caller chose: the image
    /// embeddings, the question encoded over them, the answer (`decoder_input_ids`, else the labels, which
    /// transformers takes as already starting with BOS) decoded causally over the question encoding, and with
    /// `labels` the mean cross-entropy of `labels[:, 1:]` from positions `:-1`, in float32 with the configured
    /// label smoothing. As in transformers 5.17, the answer decoder attends to every question position: its
    /// `encoder_attention_mask` (the question's mask) does not reach the cross-attention.
    pub fn forward_with(&self, inputs: &VqaInputs, cx: &ForwardContext) -> Result<VqaOutput> {
        let pixel_values = self.check_pixel_values(inputs.pixel_values, cx)?;
        let batch = pixel_values.size()[0];
        let question = self.check_ids(inputs.input_ids, "input_ids", batch)?;
        let question_mask = self.check_mask(
            inputs.attention_mask,
            "attention_mask",
            "input_ids",
            &question.size(),
        )?;
        let labels = match inputs.labels {
            None => None,
            Some(l) => Some(self.check_labels(l, batch)?),
        };
        let answer = match (inputs.decoder_input_ids, &labels) {
            (Some(ids), _) => self.check_ids(ids, "decoder_input_ids", batch)?,
            (None, Some(labels)) => {
                // transformers feeds the labels themselves to the decoder: they cannot hold -100 then.
                if bool::try_from(labels.f_lt(0)?.f_any()?)? {
                    return Err(Error::invalid(
                        "labels hold -100 (ignored positions) but no decoder_input_ids were given, so the \
                         labels are the decoder's input too; pass decoder_input_ids (the answer ids) with them",
                    ));
                }
                labels.shallow_clone()
            }
            (None, None) => {
                return Err(Error::invalid(
                    "Either `decoder_input_ids` or `labels` should be passed when calling `forward` with \
                     `BlipForQuestionAnswering`: pass labels (the answer ids) to train, decoder_input_ids to \
                     score an answer, or call generate",
                ))
            }
        };
        if let Some(l) = &labels {
            if l.size() != answer.size() {
                return Err(Error::invalid(format!(
                    "labels has shape {:?} but decoder_input_ids has {:?}; they must match",
                    l.size(),
                    answer.size()
                )));
            }
        }
        let answer_mask = self.check_mask(
            inputs.decoder_attention_mask,
            "decoder_attention_mask",
            "the decoder input",
            &answer.size(),
        )?;
        let image_embeds = self.encode_images(&pixel_values, cx)?;
        let question_embeds = self.encode_questions(&question, question_mask.as_ref(), &image_embeds, cx)?;
        let logits = self.answer_logits(&answer, answer_mask.as_ref(), &question_embeds, cx)?;
        let loss = match &labels {
            Some(labels) => Some(self.answer_loss(&logits, labels, cx)?),
            None => None,
        };
        Ok(VqaOutput {
            loss,
            image_embeds,
            question_embeds,
            logits,
        })
    }

    fn check_labels(&self, l: &Tensor, batch: i64) -> Result<Tensor> {
        if !is_index_kind(l.kind()) {
            return Err(Error::type_error(format!(
                "labels must hold integer token ids (torch.long, -100 to ignore), got {:?}",
                l.kind()
            )));
        }
        if l.dim() != 2 || l.size()[0] != batch || l.size()[1] < 1 {
            return Err(Error::invalid(format!(
                "labels must have shape [batch = {batch}, answer tokens], got {:?}",
                l.size()
            )));
        }
        let vocab = self.config.text_config.vocab_size;
        let l = l.f_to_device(self.device())?.f_to_kind(Kind::Int64)?;
        let allowed = l
            .f_ge(0)?
            .f_logical_and(&l.f_lt(vocab)?)?
            .f_logical_or(&l.f_eq(-100)?)?;
        if !bool::try_from(allowed.f_all()?)? {
            return Err(Error::invalid(format!(
                "labels must be token ids in [0, {vocab}) or -100 (ignored)"
            )));
        }
        Ok(l)
    }

    /// The answer decoder's logits `[B, Ta, V]` for `answer` (causal, with `mask`'s padding) over the
    /// question encoding.
    pub fn answer_logits(
        &self,
        answer: &Tensor,
        mask: Option<&Tensor>,
        question_embeds: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let t = answer.size()[1];
        let text_cx = text_context(cx);
        let additive = match mask {
            Some(m) => Some(causal_padding_mask(m, t, self.text_decoder.compute_kind(cx))?),
            None => None,
        };
        let masks = DecoderMasks {
            self_mask: additive.as_ref(),
            causal: additive.is_none(),
        };
        let cross = CrossStates {
            states: question_embeds,
            mask: None,
            shared: None,
            projected: None,
        };
        let hidden = self
            .text_decoder
            .hidden_states_over(answer, cross, &masks, &text_cx)?;
        self.text_decoder.logits(&hidden, &text_cx)
    }

    /// Mean cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` (ignoring -100), in float32, with
    /// `cx`'s label smoothing, else the configured one (`BlipTextLMHeadModel`'s loss, reduction "mean").
    pub fn answer_loss(&self, logits: &Tensor, labels: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let (b, t, v) = logits.size3()?;
        if t < 2 {
            // transformers' mean over no targets: NaN.
            return Ok(Tensor::f_full([], f64::NAN, (Kind::Float, logits.device()))?);
        }
        let shifted = logits
            .f_narrow(1, 0, t - 1)?
            .f_reshape([b * (t - 1), v])?
            .f_to_kind(Kind::Float)?;
        let targets = labels.f_narrow(1, 1, t - 1)?.f_reshape([b * (t - 1)])?;
        Ok(shifted.f_cross_entropy_loss::<Tensor>(
            &targets,
            None,
            tch::Reduction::Mean,
            -100,
            cx.label_smoothing
                .unwrap_or(self.config.text_config.label_smoothing),
        )?)
    }

    /// Writes a checkpoint folder transformers' `BlipForQuestionAnswering` loads: `config.json` and
    /// `model.safetensors` (atomically).
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let arch = Some("BlipForQuestionAnswering");
        super::head::save_folder(dir, &self.named_parameters(), &self.config, self.kind(), arch)
    }
}
