//! A training step with gradient checkpointing: the loss and its backward, keeping only each transformer
//! layer's input from the forward pass. The towers run their layers without a graph
//! (`forward_checkpointed`, `hidden_states_checkpointed`); after the head's backward, `blip::recompute` reruns
//! each layer with a graph, last to first, to push the incoming gradient through it.

use tch::Tensor;

use crate::blip::text::DecoderMasks;
use crate::blip::{BlipForConditionalGeneration, TEXT_SEED_OFFSET};
use crate::error::Result;
use crate::nn::attention::causal_padding_mask;

/// The training loss with gradient checkpointing, backward included: the gradients of
/// `loss · multiplier` are accumulated into the parameters, while only each transformer layer's input
/// is kept from the forward pass (the layers are recomputed one at a time during the backward).
/// `seed` fixes the dropout draws so the recomputation repeats them. Returns the loss, detached.
pub fn loss_backward(
    model: &BlipForConditionalGeneration,
    pixel_values: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    labels: &Tensor,
    multiplier: &Tensor,
    seed: i64,
) -> Result<Tensor> {
    let train = model.training;
    let vision_trains = model.vision_model.has_trainable();
    let (image, vision) = if vision_trains {
        let (image, tower) = model
            .vision_model
            .forward_checkpointed(pixel_values, train, seed)?;
        (image, Some(tower))
    } else {
        let _guard = tch::no_grad_guard();
        (model.vision_model.forward(pixel_values, train, Some(seed))?, None)
    };
    // The decoder's layers read the image through a leaf that gathers their gradients for the vision tower.
    let image_leaf = image.f_detach()?.f_set_requires_grad(vision_trains)?;
    let additive = causal_padding_mask(mask, ids.size()[1], model.text_decoder.kind())?;
    let masks = DecoderMasks {
        self_mask: Some(&additive),
        causal: false,
    };
    let text_seed = seed.wrapping_add(TEXT_SEED_OFFSET);
    let (hidden, text) =
        model
            .text_decoder
            .hidden_states_checkpointed(ids, &image_leaf, &masks, train, text_seed)?;
    let logits = model.text_decoder.logits(&hidden, train)?;
    let loss = model.caption_loss(&logits, labels)?;
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
