//! A training step with gradient checkpointing: the loss and its backward, keeping only each transformer
//! layer's input from the forward pass. The towers run their layers without a graph
//! (`forward_checkpointed`, `hidden_states_checkpointed`); after the head's backward, `blip::recompute` reruns
//! each layer with a graph, last to first, to push the incoming gradient through it.

use tch::Tensor;

use crate::blip::text::DecoderMasks;
use crate::blip::{text_context, BlipForConditionalGeneration};
use crate::error::Result;
use crate::nn::attention::causal_padding_mask;
use crate::nn::ForwardContext;

/// Which towers hold trained weights: a tower without any runs once without a graph (nothing to recompute).
#[derive(Clone, Copy, Debug)]
pub struct TrainedTowers {
    pub vision: bool,
}

impl TrainedTowers {
    /// Read once per run: which parameters train does not change between steps.
    pub fn of<T: super::task::TrainTask + ?Sized>(model: &T) -> Self {
        Self {
            vision: model.vision_model().has_trainable(),
        }
    }
}

/// The training loss with gradient checkpointing, backward included: the gradients of
/// `loss · multiplier` are accumulated into the parameters, while only each transformer layer's input
/// is kept from the forward pass (the layers are recomputed one at a time during the backward).
/// `cx` carries the step's dropout seed, so the recomputation repeats its draws. `cached`: the image
/// embeddings the feature cache gave (the vision tower trains nothing then). Returns the loss, detached.
#[allow(clippy::too_many_arguments)]
pub fn loss_backward(
    model: &BlipForConditionalGeneration,
    towers: TrainedTowers,
    pixel_values: &Tensor,
    cached: Option<Tensor>,
    ids: &Tensor,
    mask: &Tensor,
    labels: &Tensor,
    multiplier: &Tensor,
    cx: &ForwardContext,
) -> Result<Tensor> {
    let (image, vision) = if let Some(image) = cached {
        (image, None)
    } else if towers.vision {
        let (image, tower) = model.vision_model.forward_checkpointed(pixel_values, cx)?;
        (image, Some(tower))
    } else {
        let _guard = tch::no_grad_guard();
        (model.vision_model.forward(pixel_values, cx)?, None)
    };
    // The decoder's layers read the image through a leaf that gathers their gradients for the vision tower.
    let image_leaf = image.f_detach()?.f_set_requires_grad(towers.vision)?;
    let additive = causal_padding_mask(mask, ids.size()[1], model.text_decoder.compute_kind(cx))?;
    let masks = DecoderMasks {
        self_mask: Some(&additive),
        causal: false,
    };
    let text_cx = text_context(cx);
    let (hidden, text) = model
        .text_decoder
        .hidden_states_checkpointed(ids, &image_leaf, &masks, &text_cx)?;
    let loss = model.scored_caption_loss(&hidden, labels, cx)?;
    loss.f_mul(multiplier)?.f_backward()?;
    text.backward()?;
    if let Some(tower) = vision {
        let grad = image_leaf.f_grad()?;
        if grad.defined() {
            image.f_mul(&grad)?.f_sum(image.kind())?.f_backward()?;
        }
        tower.backward()?;
    }
    Ok(loss.f_detach()?)
}
