//! Mixed-adapter batches (peft's `adapter_names`): each row of a forward or `generate` call runs its own
//! adapter, or the base model for `"__base__"`. The selection is checked here once per call and handed down
//! in the forward's [`ForwardContext`](crate::nn::ForwardContext); the layers' arithmetic is
//! `LoraSlot::apply_mixed` (`layer.rs`). Nothing is stored on the model.

use crate::blip::{BlipForConditionalGeneration, BlipOutput, ForwardInputs};
use crate::error::{Error, Result};
use crate::lora::LoraHost;
use crate::nn::{AdapterRows, ForwardContext, BASE_ADAPTER};

/// The adapters the model holds (in any layer), by the names its parameters carry (`lora_A.<name>.weight`).
pub fn held_adapters<M: LoraHost + ?Sized>(model: &M) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (path, _) in model.plain_named_parameters() {
        if let Some(rest) = path.rsplit_once(".lora_A.").map(|(_, r)| r) {
            if let Some(name) = rest.strip_suffix(".weight") {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

/// Checks `adapter_names` for a batch of `batch` rows (images, or texts: any head's) and returns the selection: one name per row,
/// each an adapter the model holds or `"__base__"`; inference only; not with `modules_to_save`.
pub fn adapter_rows<M: LoraHost + ?Sized>(
    model: &M,
    adapter_names: &[String],
    batch: i64,
    training: bool,
) -> Result<AdapterRows> {
    if training {
        return Err(Error::invalid(
            "adapter_names is for inference (peft refuses it in training mode); call model.eval() first",
        ));
    }
    if adapter_names.len() as i64 != batch {
        return Err(Error::invalid(format!(
            "adapter_names has {} names but the batch has {batch} images; give one name per image \
             (\"{BASE_ADAPTER}\" for the base model)",
            adapter_names.len()
        )));
    }
    let held = held_adapters(model);
    let mut unknown: Vec<&str> = adapter_names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != BASE_ADAPTER && !held.iter().any(|h| h == n))
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    if !unknown.is_empty() {
        return Err(Error::invalid(format!(
            "adapter_names names adapter(s) the model does not hold: {}; it holds {held:?} (or \"{BASE_ADAPTER}\")",
            unknown.join(", ")
        )));
    }
    if !model.saved_modules().is_empty() {
        return Err(Error::Unsupported(
            "adapter_names with modules_to_save adapters is not supported: their module copies are swapped \
             into the layers for one adapter at a time"
                .into(),
        ));
    }
    Ok(AdapterRows::new(adapter_names))
}

/// The forward pass with each row's adapter (peft's `model(..., adapter_names=[...])`).
pub fn forward(
    model: &BlipForConditionalGeneration,
    inputs: &ForwardInputs,
    adapter_names: &[String],
) -> Result<BlipOutput> {
    let batch = inputs.pixel_values.size().first().copied().unwrap_or(0);
    let rows = adapter_rows(model, adapter_names, batch, model.training)?;
    let cx = ForwardContext::mode(model.training).with_adapters(Some(&rows), Some(&rows));
    model.forward_with(inputs, &cx)
}
