//! What a BLIP head gives the trainer ([`TrainTask`]): its training loss for a batch (over image embeddings,
//! so that the feature cache can hold the frozen vision tower's output), its parameters and LoRA host, its
//! vision tower, saving. The captioner, the VQA head and the retrieval head (with its learned temperature,
//! [`RetrievalTask`]) implement it; `Trainer::run` is written once over it.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::checkpointed_step::TrainedTowers;
use crate::blip::retrieval::{BlipForImageTextRetrieval, TEMP_MAX, TEMP_MIN};
use crate::blip::text::CrossProjections;
use crate::blip::vision::BlipVisionModel;
use crate::blip::{BlipForConditionalGeneration, BlipForQuestionAnswering};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::lora::LoraHost;
use crate::nn::ForwardContext;

/// The file beside a retrieval adapter (and in each checkpoint) that holds the learned temperature.
pub const RETRIEVAL_CONFIG_NAME: &str = "retrieval_config.json";

/// What the trainer needs of the model it trains.
pub trait TrainTask {
    /// transformers' class name of the head (for messages).
    fn head_name(&self) -> &'static str;
    /// The model as LoRA sees it (saving and loading adapters in checkpoints).
    fn lora_host(&mut self) -> &mut dyn LoraHost;
    /// Every parameter as transformers names it.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// Trained tensors outside the parameter tree (retrieval's temperature), after the parameters in the
    /// optimizer, without weight decay.
    fn extra_trained(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn device(&self) -> Device;
    fn vision_model(&self) -> &BlipVisionModel;
    fn vision_model_mut(&mut self) -> &mut BlipVisionModel;
    /// Checks `pixel_values` and moves them to the model's device and kind.
    fn check_pixel_values(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor>;
    /// Image embeddings of checked pixels.
    fn encode_images(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        self.vision_model().forward(pixel_values, cx)
    }
    /// The training loss of `batch` (on the host or the device) over its image embeddings `image`, with its
    /// graph; None when the batch has nothing to learn from (a retrieval batch of one image).
    fn loss_over_images(&self, batch: &Batch, image: &Tensor, cx: &ForwardContext) -> Result<Option<Tensor>>;
    /// The frozen cross-attention projections of `image` (`[B, N, C]` embeddings) the head's loss can be given
    /// ([`CrossProjections`]), without a graph; None (the default) when its loss reads none or they train.
    fn cross_projections(&self, _image: &Tensor, _cx: &ForwardContext) -> Result<Option<CrossProjections>> {
        Ok(None)
    }
    /// [`Self::loss_over_images`] given `projected`, [`Self::cross_projections`] of the same `image`; the
    /// same loss, without recomputing them.
    fn loss_over_projected_images(
        &self,
        batch: &Batch,
        image: &Tensor,
        _projected: &CrossProjections,
        cx: &ForwardContext,
    ) -> Result<Option<Tensor>> {
        self.loss_over_images(batch, image, cx)
    }
    /// The loss with gradient checkpointing, its backward included (gradients of `loss · multiplier`); the
    /// loss comes back detached. By default the vision tower's layers are recomputed in the backward and the
    /// text towers keep their activations.
    #[allow(clippy::too_many_arguments)]
    fn loss_backward_checkpointed(
        &self,
        towers: TrainedTowers,
        pixel_values: &Tensor,
        cached: Option<Tensor>,
        batch: &Batch,
        multiplier: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Option<Tensor>> {
        let (image, tower) = if let Some(image) = cached {
            (image, None)
        } else if towers.vision {
            let (image, tower) = self.vision_model().forward_checkpointed(pixel_values, cx)?;
            (image, Some(tower))
        } else {
            let _guard = tch::no_grad_guard();
            (self.vision_model().forward(pixel_values, cx)?, None)
        };
        let Some(loss) = self.loss_over_images(batch, &image, cx)? else {
            return Ok(None);
        };
        loss.f_mul(multiplier)?.f_backward()?;
        if let Some(tower) = tower {
            tower.backward()?;
        }
        Ok(Some(loss.f_detach()?))
    }
    /// The whole model as a transformers folder (full fine-tuning's checkpoints).
    fn save_pretrained(&self, dir: &Path) -> Result<()>;
    /// Files a checkpoint holds besides the weights (retrieval: the temperature).
    fn save_extra(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Reads back what [`Self::save_extra`] wrote (resuming, or loading the best checkpoint).
    fn load_extra(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// The captioner itself, for what only it offers (the model lent to a Python callback).
    fn as_captioner(&self) -> Option<&BlipForConditionalGeneration> {
        None
    }
}

/// A batch tensor on `device`.
fn on(t: &Tensor, device: Device) -> Result<Tensor> {
    Ok(t.f_to_device(device)?)
}

fn missing(what: &str, head: &str) -> Error {
    Error::invalid(format!(
        "a {head} training batch needs {what}; the batch source did not give it"
    ))
}

impl TrainTask for BlipForConditionalGeneration {
    fn head_name(&self) -> &'static str {
        "BlipForConditionalGeneration"
    }
    fn lora_host(&mut self) -> &mut dyn LoraHost {
        self
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        BlipForConditionalGeneration::named_parameters(self)
    }
    fn device(&self) -> Device {
        BlipForConditionalGeneration::device(self)
    }
    fn vision_model(&self) -> &BlipVisionModel {
        &self.vision_model
    }
    fn vision_model_mut(&mut self) -> &mut BlipVisionModel {
        &mut self.vision_model
    }
    fn check_pixel_values(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        BlipForConditionalGeneration::check_pixel_values(self, pixel_values, cx)
    }
    fn encode_images(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        BlipForConditionalGeneration::encode_images(self, pixel_values, cx)
    }
    fn loss_over_images(&self, batch: &Batch, image: &Tensor, cx: &ForwardContext) -> Result<Option<Tensor>> {
        caption_loss(self, batch, image, None, cx)
    }
    fn cross_projections(&self, image: &Tensor, cx: &ForwardContext) -> Result<Option<CrossProjections>> {
        BlipForConditionalGeneration::cross_projections(self, image, cx)
    }
    fn loss_over_projected_images(
        &self,
        batch: &Batch,
        image: &Tensor,
        projected: &CrossProjections,
        cx: &ForwardContext,
    ) -> Result<Option<Tensor>> {
        caption_loss(self, batch, image, Some(projected), cx)
    }
    fn loss_backward_checkpointed(
        &self,
        towers: TrainedTowers,
        pixel_values: &Tensor,
        cached: Option<Tensor>,
        batch: &Batch,
        multiplier: &Tensor,
        cx: &ForwardContext,
    ) -> Result<Option<Tensor>> {
        let device = BlipForConditionalGeneration::device(self);
        let ids = on(&batch.input_ids, device)?;
        let mask = on(&batch.attention_mask, device)?;
        let labels = on(&batch.labels, device)?;
        super::checkpointed_step::loss_backward(
            self,
            towers,
            pixel_values,
            cached,
            &ids,
            &mask,
            &labels,
            multiplier,
            cx,
        )
        .map(Some)
    }
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        BlipForConditionalGeneration::save_pretrained(self, dir)
    }
    fn as_captioner(&self) -> Option<&BlipForConditionalGeneration> {
        Some(self)
    }
}

/// The captioner's loss of `batch` over `image` (and its cross-attention projections when given).
fn caption_loss(
    model: &BlipForConditionalGeneration,
    batch: &Batch,
    image: &Tensor,
    projected: Option<&CrossProjections>,
    cx: &ForwardContext,
) -> Result<Option<Tensor>> {
    let device = model.device();
    let ids = on(&batch.input_ids, device)?;
    let mask = on(&batch.attention_mask, device)?;
    let labels = on(&batch.labels, device)?;
    Ok(Some(model.decode_loss(
        &ids,
        Some(&mask),
        image,
        projected,
        &labels,
        cx,
    )?))
}

/// transformers' `BlipForQuestionAnswering` loss: the question (`input_ids`, `attention_mask`) encoded over
/// the image, the answer (`decoder_input_ids`, `decoder_attention_mask`) decoded over the question encoding,
/// `labels` (the answer ids, pads -100) scored shifted by one.
impl TrainTask for BlipForQuestionAnswering {
    fn head_name(&self) -> &'static str {
        "BlipForQuestionAnswering"
    }
    fn lora_host(&mut self) -> &mut dyn LoraHost {
        self
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        BlipForQuestionAnswering::named_parameters(self)
    }
    fn device(&self) -> Device {
        BlipForQuestionAnswering::device(self)
    }
    fn vision_model(&self) -> &BlipVisionModel {
        &self.vision_model
    }
    fn vision_model_mut(&mut self) -> &mut BlipVisionModel {
        &mut self.vision_model
    }
    fn check_pixel_values(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        BlipForQuestionAnswering::check_pixel_values(self, pixel_values, cx)
    }
    fn loss_over_images(&self, batch: &Batch, image: &Tensor, cx: &ForwardContext) -> Result<Option<Tensor>> {
        let head = "BlipForQuestionAnswering";
        let device = BlipForQuestionAnswering::device(self);
        let answer = batch
            .decoder_input_ids
            .as_ref()
            .ok_or_else(|| missing("the answers' ids (decoder_input_ids)", head))?;
        let answer_mask = batch.decoder_attention_mask.as_ref();
        let question = on(&batch.input_ids, device)?;
        let question_mask = on(&batch.attention_mask, device)?;
        let answer = on(answer, device)?;
        let answer_mask = answer_mask.map(|m| on(m, device)).transpose()?;
        let labels = on(&batch.labels, device)?;
        let question_embeds = self.encode_questions(&question, Some(&question_mask), image, cx)?;
        let logits = self.answer_logits(&answer, answer_mask.as_ref(), &question_embeds, cx)?;
        Ok(Some(self.answer_loss(&logits, &labels, cx)?))
    }
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        BlipForQuestionAnswering::save_pretrained(self, dir)
    }
}

/// The retrieval head with the temperature it learns: BLIP's losses, ITC + ITM on hard negatives, over each
/// batch of pairs (rows with the same `image_ids` are positives for each other).
pub struct RetrievalTask<'a> {
    pub model: &'a mut BlipForImageTextRetrieval,
    /// The contrastive temperature: a 0-dim float32 tensor on the model's device, trained when it requires
    /// grad (clamped to [0.001, 0.5] before each use, as BLIP does).
    pub temp: Tensor,
}

impl RetrievalTask<'_> {
    /// The seed of a micro-batch's hard-negative draws: its dropout seed in training (a resumed run repeats
    /// them), 0 in evaluation (every evaluation of the same weights gives the same loss).
    fn negatives_seed(cx: &ForwardContext) -> Option<i64> {
        Some(cx.dropout_seed.unwrap_or(0))
    }
}

impl TrainTask for RetrievalTask<'_> {
    fn head_name(&self) -> &'static str {
        "BlipForImageTextRetrieval"
    }
    fn lora_host(&mut self) -> &mut dyn LoraHost {
        self.model
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.model.named_parameters()
    }
    fn extra_trained(&self) -> Vec<(String, Tensor)> {
        if self.temp.requires_grad() {
            vec![("temp".into(), self.temp.shallow_clone())]
        } else {
            Vec::new()
        }
    }
    fn device(&self) -> Device {
        self.model.device()
    }
    fn vision_model(&self) -> &BlipVisionModel {
        &self.model.vision_model
    }
    fn vision_model_mut(&mut self) -> &mut BlipVisionModel {
        &mut self.model.vision_model
    }
    fn check_pixel_values(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        self.model.check_pixel_values(pixel_values, cx)
    }
    fn loss_over_images(&self, batch: &Batch, image: &Tensor, cx: &ForwardContext) -> Result<Option<Tensor>> {
        let head = "BlipForImageTextRetrieval";
        let ids = batch
            .image_ids
            .as_ref()
            .ok_or_else(|| missing("each pair's image id (image_ids)", head))?;
        // A batch of one pair, or of one image's pairs, has no negative to contrast with.
        let distinct = ids.f_unique_dim(0, false, false, false)?.0.size()[0];
        if batch.input_ids.size()[0] < 2 || distinct < 2 {
            return Ok(None);
        }
        let losses = self.model.losses_over_images(
            image,
            &batch.input_ids,
            Some(&batch.attention_mask),
            Some(ids),
            &self.temp,
            Self::negatives_seed(cx),
            cx,
        )?;
        Ok(Some(losses.itc.f_add(&losses.itm)?))
    }
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        self.model.save_pretrained(dir)
    }
    fn save_extra(&self, dir: &Path) -> Result<()> {
        write_temperature(dir, &self.temp)
    }
    fn load_extra(&self, dir: &Path) -> Result<()> {
        let path = dir.join(RETRIEVAL_CONFIG_NAME);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::not_found("retrieval checkpoint's temperature", &path),
            _ => Error::io(format!("cannot read {}", path.display()), e),
        })?;
        let value = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("temp").and_then(serde_json::Value::as_f64))
            .filter(|t| t.is_finite() && *t > 0.0)
            .ok_or_else(|| {
                Error::checkpoint(format!(
                    "{} must hold {{\"temp\": <a positive number>}}",
                    path.display()
                ))
            })?;
        let _guard = tch::no_grad_guard();
        let _ = self
            .temp
            .shallow_clone()
            .f_fill_(value.clamp(TEMP_MIN, TEMP_MAX))?;
        Ok(())
    }
}

/// Writes `{"temp": <value>}` (the temperature clamped as the losses use it) into `dir`, atomically.
pub fn write_temperature(dir: &Path, temp: &Tensor) -> Result<()> {
    let value = f64::try_from(
        temp.f_detach()?
            .f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?,
    )?;
    let text = serde_json::to_string_pretty(&serde_json::json!({ "temp": value.clamp(TEMP_MIN, TEMP_MAX) }))
        .map_err(|e| Error::invalid(format!("cannot serialise the temperature: {e}")))?;
    crate::weights::write_atomic(&dir.join(RETRIEVAL_CONFIG_NAME), format!("{text}\n").as_bytes())
}
