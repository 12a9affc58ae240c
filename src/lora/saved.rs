//! peft's `modules_to_save`: whole modules that train in full next to the adapters. Each adapter gets its
//! own copy of the module (peft's `ModulesToSaveWrapper`); the model's layers hold the active copy's
//! tensors, or the original's when no adapter with a copy is active or adapters are disabled.
//!
//! Names follow peft: `<path>.original_module.<param>` and `<path>.modules_to_save.<adapter>.<param>` in
//! `named_parameters`; the adapter file stores the copy under the original key (`<path>.<param>`).

use std::collections::HashMap;

use tch::Tensor;

use super::host::LoraHost;
use crate::error::{Error, Result};
use crate::nn::saved::{is_under, SavedModule};
use crate::repr::ReprNode;

/// Every module path in the model, parents before children: the printed tree's, peft's wrappers and LoRA's
/// submodules included, as in peft's `named_modules()`.
pub fn module_paths<M: LoraHost + ?Sized>(model: &M) -> Vec<String> {
    fn walk(node: &ReprNode, prefix: &str, out: &mut Vec<String>) {
        for (name, child) in &node.children {
            let path = crate::nn::join(prefix, name);
            out.push(path.clone());
            walk(child, &path, out);
        }
    }
    let mut out = Vec::new();
    walk(&model.repr_node(), "", &mut out);
    out
}

/// The modules `names` wraps: those whose path ends with one of them (peft's `_set_trainable` matching),
/// outermost first. `lora_layers` are the layers holding adapters: a module that contains one cannot
/// also be copied. Fails, changing nothing, when a name matches nothing or a module cannot be copied.
pub fn plan<M: LoraHost + ?Sized>(
    model: &M,
    names: &[String],
    lora_layers: &[String],
) -> Result<Vec<String>> {
    let mut chosen: Vec<String> = Vec::new();
    for path in module_paths(model) {
        if !names.iter().any(|n| path.ends_with(n.as_str())) {
            continue;
        }
        // A module inside one already chosen is copied with it.
        if chosen.iter().any(|c| is_under(&path, c)) {
            continue;
        }
        chosen.push(path);
    }
    if chosen.is_empty() {
        return Err(Error::invalid(format!(
            "modules_to_save {names:?} matches no module of the model (a name matches the modules whose path \
             ends with it, e.g. \"post_layernorm\" or \"crossattention\"); print(model) shows the module names"
        )));
    }
    let tied_head = model.tied_layer();
    for path in &chosen {
        if let Some(layer) = lora_layers.iter().find(|l| is_under(l, path)) {
            return Err(Error::invalid(format!(
                "modules_to_save would copy {path:?}, which holds the LoRA layer {layer:?}; a module is either \
                 adapted or trained in full: narrow modules_to_save or exclude it from target_modules"
            )));
        }
        if tied_head.is_some_and(|head| is_under(head, path)) {
            return Err(Error::invalid(format!(
                "modules_to_save would copy {path:?}, which holds the LM head tied to the word embeddings; \
                 copying it would untie them. Train the head's other parts (e.g. \"transform\") or target \
                 \"text_decoder.cls.predictions.decoder\" with LoRA"
            )));
        }
    }
    for path in &chosen {
        if let Some(m) = model
            .saved_modules()
            .iter()
            .find(|m| m.path != *path && (is_under(&m.path, path) || is_under(path, &m.path)))
        {
            return Err(Error::invalid(format!(
                "modules_to_save {path:?} overlaps {:?}, which another adapter already trains in full",
                m.path
            )));
        }
    }
    Ok(chosen)
}

/// Gives `adapter` a copy of each module in `chosen` (from [`plan`]), wrapping the ones not yet wrapped.
/// `activate` makes the new copies the ones in use.
pub fn add<M: LoraHost + ?Sized>(
    model: &mut M,
    chosen: Vec<String>,
    adapter: &str,
    activate: bool,
) -> Result<()> {
    if chosen.is_empty() {
        return Ok(());
    }
    let params = model.plain_named_parameters();
    // Fresh leaves: copies made outside autograd.
    let copy_all = |tensors: &[Tensor]| -> Result<Vec<Tensor>> {
        let _guard = tch::no_grad_guard();
        tensors
            .iter()
            .map(|t| Ok(t.f_detach()?.f_detach_copy()?))
            .collect()
    };
    for path in chosen {
        if let Some(m) = model.saved_modules_mut().iter_mut().find(|m| m.path == path) {
            // Another adapter's copy, made from the original as peft deep-copies `original_module`.
            let copy = copy_all(&m.original)?;
            m.copies.push((adapter.to_string(), copy));
            if activate {
                m.active = Some(adapter.to_string());
            }
            continue;
        }
        let (names, original): (Vec<String>, Vec<Tensor>) = params
            .iter()
            .filter(|(n, _)| is_under(n, &path))
            .map(|(n, t)| (n[path.len() + 1..].to_string(), t.shallow_clone()))
            .unzip();
        let copy = copy_all(&original)?;
        model.saved_modules_mut().push(SavedModule {
            path,
            names,
            original,
            copies: vec![(adapter.to_string(), copy)],
            active: activate.then(|| adapter.to_string()),
            disabled: false,
        });
    }
    swap_in(model)
}

/// Points the model's layers at the tensors each wrapped module uses now.
fn swap_in<M: LoraHost + ?Sized>(model: &mut M) -> Result<()> {
    let mut wanted: HashMap<String, Tensor> = HashMap::new();
    for m in model.saved_modules() {
        for (name, t) in m.names.iter().zip(m.in_use()) {
            wanted.insert(format!("{}.{name}", m.path), t.shallow_clone());
        }
    }
    if !wanted.is_empty() {
        model.visit_params_mut(&mut |name, t| {
            if let Some(w) = wanted.get(name) {
                *t = w.shallow_clone();
            }
        });
    }
    Ok(())
}

/// Uses `adapter`'s copies where it has them, the originals elsewhere.
pub fn set_active<M: LoraHost + ?Sized>(model: &mut M, adapter: &str) -> Result<()> {
    for m in model.saved_modules_mut() {
        m.active = m.copy_of(adapter).map(|_| adapter.to_string());
    }
    swap_in(model)
}

/// Uses the originals while `disabled`.
pub fn set_disabled<M: LoraHost + ?Sized>(model: &mut M, disabled: bool) -> Result<()> {
    for m in model.saved_modules_mut() {
        m.disabled = disabled;
    }
    swap_in(model)
}

/// Drops `adapter`'s copies; the modules it was using go back to their originals.
pub fn delete<M: LoraHost + ?Sized>(model: &mut M, adapter: &str) -> Result<()> {
    for m in model.saved_modules_mut() {
        m.copies.retain(|(n, _)| n != adapter);
        if m.active.as_deref() == Some(adapter) {
            m.active = None;
        }
    }
    swap_in(model)
}

/// Removes the wrappers, keeping the active copies in the model (peft's `unload`/`merge_and_unload`).
pub fn unload<M: LoraHost + ?Sized>(model: &mut M) -> Result<()> {
    for m in model.saved_modules_mut() {
        m.disabled = false;
    }
    swap_in(model)?;
    model.saved_modules_mut().clear();
    Ok(())
}

/// `adapter`'s copies under peft's file keys (`base_model.model.<path>.<param>`).
pub fn adapter_state<M: LoraHost + ?Sized>(model: &M, adapter: &str) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for m in model.saved_modules() {
        if let Some(copy) = m.copy_of(adapter) {
            for (name, t) in m.names.iter().zip(copy) {
                out.push((format!("base_model.model.{}.{name}", m.path), t.shallow_clone()));
            }
        }
    }
    out
}

/// Makes `adapter`'s copies trainable (everything else in the wrapped modules frozen).
pub fn mark_trainable<M: LoraHost + ?Sized>(model: &M, adapter: &str) -> Result<()> {
    for m in model.saved_modules() {
        for t in &m.original {
            let _ = t.f_set_requires_grad(false)?;
        }
        for (name, copy) in &m.copies {
            for t in copy {
                let _ = t.f_set_requires_grad(name == adapter)?;
            }
        }
    }
    Ok(())
}
