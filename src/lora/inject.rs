//! Putting adapters into a model by module path (peft's `inject_adapter`), choosing what trains,
//! and the model-wide adapter operations: merge, unmerge, disable, unload, delete, state in and out.

use std::collections::BTreeMap;

use regex::Regex;
use tch::{Kind, Tensor};

use super::config::{saved_module_regex, InitLoraWeights, LoraConfig, TargetModules};
use super::host::LoraHost;
use super::layer::{kaiming_uniform, weight_norm, BaseKind, LoraAdapter, LoraSlot};
use super::saved;
use crate::error::{Error, Result};
use crate::nn::AdaptableLayer;

/// What LoRA needs of the layer it wraps.
impl AdaptableLayer<'_> {
    /// The layer's adapter, when it is LoRA's (the only kind this crate makes).
    fn slot(&mut self) -> Option<&mut LoraSlot> {
        self.adapter()
            .as_mut()
            .and_then(|a| a.as_any_mut().downcast_mut::<LoraSlot>())
    }

    fn adapter(&mut self) -> &mut Option<Box<dyn crate::nn::Adapter>> {
        match self {
            Self::Linear(l) => &mut l.lora,
            Self::Conv2d(c) => &mut c.lora,
        }
    }

    /// The geometry the low-rank branch needs.
    fn base_kind(&self) -> BaseKind {
        match self {
            Self::Linear(_) => BaseKind::Linear,
            Self::Conv2d(c) => BaseKind::Conv2d {
                kernel: c.kernel,
                stride: c.stride,
            },
        }
    }

    fn weight(&self) -> &Tensor {
        match self {
            Self::Linear(l) => &l.weight,
            Self::Conv2d(c) => &c.weight,
        }
    }

    fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Linear(l) => l.bias.as_ref(),
            Self::Conv2d(c) => c.bias.as_ref(),
        }
    }
}

/// A layer's path, type and shape, as `blip_peft.lora_targets(model)` lists them.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetInfo {
    pub path: String,
    pub layer_type: &'static str,
    pub in_features: i64,
    pub out_features: i64,
}

/// Every layer LoRA can target.
pub fn targetable_layers<M: LoraHost + ?Sized>(model: &mut M) -> Result<Vec<TargetInfo>> {
    let mut out = Vec::new();
    model.for_each_layer(&mut |path, layer| {
        let (layer_type, i, o) = match &layer {
            AdaptableLayer::Linear(l) => ("Linear", l.in_features, l.out_features),
            AdaptableLayer::Conv2d(c) => ("Conv2d", c.in_channels, c.out_channels),
        };
        out.push(TargetInfo {
            path: path.to_string(),
            layer_type,
            in_features: i,
            out_features: o,
        });
        Ok(())
    })?;
    Ok(out)
}

fn list_matches(items: &[String], key: &str) -> bool {
    items.iter().any(|t| key == t || key.ends_with(&format!(".{t}")))
}

fn full_match(pattern: &str, key: &str) -> bool {
    Regex::new(&format!("^(?:{pattern})$"))
        .map(|re| re.is_match(key))
        .unwrap_or(false)
}

/// peft's `check_target_module_exists` for one module path.
pub fn is_targeted(config: &LoraConfig, key: &str, is_linear: bool) -> bool {
    match &config.exclude_modules {
        Some(TargetModules::Regex(p)) if full_match(p, key) => return false,
        Some(TargetModules::List(items)) if list_matches(items, key) => return false,
        _ => {}
    }
    // A module trained in full (or inside one) never gets an adapter too.
    let mut saved = config.modules_to_save.iter().flatten();
    if saved.any(|m| saved_module_regex(m).is_ok_and(|re| re.is_match(key))) {
        return false;
    }
    match &config.target_modules {
        None => false,
        Some(TargetModules::AllLinear) => is_linear,
        Some(TargetModules::Regex(p)) => full_match(p, key),
        Some(TargetModules::List(items)) if items.iter().any(|t| t == key) => true,
        Some(TargetModules::List(items)) => {
            if !list_matches(items, key) {
                return false;
            }
            let Some(indexes) = &config.layers_to_transform else {
                return true;
            };
            match layer_index(key, config.layers_pattern.as_deref()) {
                Some(i) => indexes.contains(&i),
                None => false,
            }
        }
    }
}

/// The index after a `layers`-like segment (peft: the first number following a name segment).
fn layer_index(key: &str, patterns: Option<&[String]>) -> Option<i64> {
    let regexes: Vec<String> = match patterns {
        None | Some([]) => vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()],
        Some(ps) => ps.iter().map(|p| format!(r"^(?:|.*?\.){p}\.(\d+)\.")).collect(),
    };
    regexes
        .iter()
        .find_map(|r| Regex::new(r).ok()?.captures(key)?.get(1)?.as_str().parse().ok())
}

fn new_adapter(config: &LoraConfig, path: &str, base: BaseKind, weight: &Tensor) -> Result<LoraAdapter> {
    let (r, alpha) = config.rank_alpha(path);
    let size = weight.size();
    let (out, a_shape, b_shape) = match base {
        BaseKind::Linear => (size[0], vec![r, size[1]], vec![size[0], r]),
        BaseKind::Conv2d { kernel, .. } => {
            (size[0], vec![r, size[1], kernel, kernel], vec![size[0], r, 1, 1])
        }
    };
    let _ = out;
    let device = weight.device();
    let scaling = config.scaling(r, alpha);
    let (a, b) = match config.init_lora_weights {
        InitLoraWeights::Default => (
            kaiming_uniform(&a_shape, device)?,
            Tensor::f_zeros(&b_shape, (Kind::Float, device))?,
        ),
        InitLoraWeights::Random => (
            kaiming_uniform(&a_shape, device)?,
            kaiming_uniform(&b_shape, device)?,
        ),
        InitLoraWeights::Gaussian => (
            Tensor::f_randn(&a_shape, (Kind::Float, device))?.f_mul_scalar(1.0 / r as f64)?,
            Tensor::f_zeros(&b_shape, (Kind::Float, device))?,
        ),
        InitLoraWeights::Pissa | InitLoraWeights::Olora => {
            decompose_base(&config.init_lora_weights, weight, r, scaling)?
        }
    };
    let mut adapter = LoraAdapter {
        a: a.f_set_requires_grad(true)?,
        b: b.f_set_requires_grad(true)?,
        r,
        alpha,
        scaling,
        dropout: config.lora_dropout,
        magnitude: None,
        merged_norm: None,
    };
    if config.use_dora {
        // DoRA starts with the magnitude of the (adapted) base weight, so the layer is unchanged at first.
        let _guard = tch::no_grad_guard();
        let w = weight
            .f_to_kind(Kind::Float)?
            .f_add(&adapter.delta_weight(&size)?)?;
        adapter.magnitude = Some(weight_norm(&w, base)?.f_detach()?.f_set_requires_grad(true)?);
    }
    Ok(adapter)
}

/// PiSSA / OLoRA: A and B take the principal part of W (top singular vectors, or the leading QR factors),
/// and W keeps the rest, `W - s·B·A`, so the layer's output is unchanged. Computed in float32, as peft.
fn decompose_base(init: &InitLoraWeights, weight: &Tensor, r: i64, scaling: f64) -> Result<(Tensor, Tensor)> {
    let _guard = tch::no_grad_guard();
    let w = weight.f_to_kind(Kind::Float)?;
    let (a, b) = if *init == InitLoraWeights::Pissa {
        // W = U·S·Vᵀ with W `[out, in]` (torch.svd, reduced): B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ.
        let (u, s, v) = w.f_svd(true, true)?;
        let sqrt_s = s.f_narrow(0, 0, r)?.f_div_scalar(scaling)?.f_sqrt()?;
        let a = v
            .f_narrow(1, 0, r)?
            .f_transpose(0, 1)?
            .f_mul(&sqrt_s.f_unsqueeze(1)?)?
            .f_contiguous()?;
        let b = u
            .f_narrow(1, 0, r)?
            .f_mul(&sqrt_s.f_unsqueeze(0)?)?
            .f_contiguous()?;
        (a, b)
    } else {
        // W = Q·R: B = Q[:, :r], A = R[:r].
        let (q, rr) = Tensor::f_linalg_qr(&w, "reduced")?;
        (
            rr.f_narrow(0, 0, r)?.f_contiguous()?,
            q.f_narrow(1, 0, r)?.f_contiguous()?,
        )
    };
    let residual = w.f_sub(&b.f_matmul(&a)?.f_mul_scalar(scaling)?)?;
    let mut base = weight.shallow_clone();
    base.f_copy_(&residual.f_to_kind(weight.kind())?)?;
    Ok((a, b))
}

/// Adds adapter `name` to every layer `config` targets. Layers that get their first adapter make it
/// active. Fails, listing the layer names that exist, when nothing matches.
pub fn inject<M: LoraHost + ?Sized>(model: &mut M, config: &LoraConfig, name: &str) -> Result<Vec<String>> {
    config.validate()?;
    if config.target_modules.is_none() {
        return Err(Error::invalid(
            "target_modules is required for BLIP (peft has no default list for it); for example \
             [\"query\", \"value\"] or \"all-linear\". blip_peft.lora_targets(model) lists the layers.",
        ));
    }
    if adapter_names(model)?.iter().any(|n| n == name) {
        return Err(Error::invalid(format!(
            "an adapter named {name:?} already exists; choose another name"
        )));
    }
    let first_adapter = adapter_names(model)?.is_empty();
    // Everything that can fail is checked before any layer changes (PiSSA/OLoRA rewrite base weights).
    let mut targeted = Vec::new();
    let mut all_names = Vec::new();
    // What the new adapter weights take (float32 A and B), counted without overflow: an absurd `r` is a
    // MemoryError naming it before anything is allocated, not libtorch's "Storage size calculation overflowed".
    let mut adapter_bytes: Option<u128> = Some(0);
    model.for_each_layer(&mut |path, layer| {
        let is_linear = matches!(layer, AdaptableLayer::Linear(_));
        all_names.push((path.to_string(), is_linear));
        if is_targeted(config, path, is_linear) {
            let (r, _) = config.rank_alpha(path);
            let size = layer.weight().size();
            let fan_in: u128 = size[1..].iter().map(|&d| d.max(0) as u128).product();
            adapter_bytes = adapter_bytes
                .zip((r.max(0) as u128).checked_mul(fan_in + size[0].max(0) as u128))
                .and_then(|(total, n)| total.checked_add(n.checked_mul(4)?));
            if matches!(layer, AdaptableLayer::Conv2d(_)) && config.init_lora_weights.rewrites_base() {
                return Err(Error::invalid(format!(
                    "Unknown initialization init_lora_weights={} for the Conv2d layer {path:?}: PiSSA and OLoRA \
                     are for Linear layers (as in peft); leave the Conv2d out of target_modules",
                    config.init_lora_weights.to_json()
                )));
            }
            targeted.push(path.to_string());
        }
        Ok(())
    })?;
    check_targets(config, &targeted, &all_names)?;
    let device = model.device();
    crate::device::check_fits(
        adapter_bytes,
        device,
        &format!(
            "LoRA adapter {name:?} with r={} on {} layers",
            config.r,
            targeted.len()
        ),
        "use a smaller r (ranks of 4 to 64 are usual; r above a layer's width adds nothing)",
    )?;
    let saved_paths = match &config.modules_to_save {
        Some(names) if !names.is_empty() => {
            let mut lora_layers = layers_with_adapters(model)?;
            lora_layers.extend(targeted.iter().cloned());
            saved::plan(model, names, &lora_layers)?
        }
        _ => Vec::new(),
    };
    model.for_each_layer(&mut |path, mut layer| {
        if !targeted.iter().any(|t| t == path) {
            return Ok(());
        }
        let base = layer.base_kind();
        let adapter = new_adapter(config, path, base, layer.weight())?;
        if layer.adapter().is_none() {
            *layer.adapter() = Some(Box::new(LoraSlot::new(base)));
        }
        let Some(slot) = layer.slot() else {
            return Err(Error::invalid(format!(
                "{path} holds an adapter that is not LoRA's"
            )));
        };
        if slot.active.is_empty() {
            slot.active.push(name.to_string());
        }
        slot.adapters.push((name.to_string(), adapter));
        Ok(())
    })?;
    saved::add(model, saved_paths, name, first_adapter)?;
    Ok(targeted)
}

/// The paths of the layers that hold any adapter.
fn layers_with_adapters<M: LoraHost + ?Sized>(model: &mut M) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for_each_slot(model, &mut |path, _, _| {
        out.push(path.to_string());
        Ok(())
    })?;
    Ok(out)
}

/// The checks that need the injection's outcome: something matched, and every rank/alpha pattern did.
fn check_targets(config: &LoraConfig, targeted: &[String], all_names: &[(String, bool)]) -> Result<()> {
    if targeted.is_empty() {
        // The modules exist but the filters left none: say which filter did it, not "not found".
        let unfiltered = LoraConfig {
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: None,
            ..config.clone()
        };
        let matched = all_names
            .iter()
            .filter(|(n, linear)| is_targeted(&unfiltered, n, *linear))
            .count();
        if matched > 0 {
            let mut filters = Vec::new();
            if let Some(e) = &config.exclude_modules {
                filters.push(format!("exclude_modules={}", e.to_json()));
            }
            if let Some(l) = &config.layers_to_transform {
                filters.push(format!("layers_to_transform={l:?}"));
            }
            if let Some(p) = &config.layers_pattern {
                filters.push(format!("layers_pattern={p:?}"));
            }
            if let Some(m) = &config.modules_to_save {
                filters.push(format!("modules_to_save={m:?}"));
            }
            return Err(Error::invalid(format!(
                "target_modules match {matched} layers, but {} excluded all of them, so no layer would get the \
                 adapter; loosen the filter (layer indexes count from 0; blip_peft.lora_targets(model) lists \
                 every full name)",
                filters.join(" and ")
            )));
        }
        let mut suffixes: Vec<&str> = all_names
            .iter()
            .map(|(n, _)| n.rsplit('.').next().unwrap_or(n))
            .collect();
        suffixes.sort();
        suffixes.dedup();
        let wanted = match &config.target_modules {
            Some(TargetModules::List(items)) => format!("{items:?}"),
            Some(TargetModules::Regex(r)) => format!("{r:?}"),
            _ => "all-linear".into(),
        };
        return Err(Error::invalid(format!(
            "Target modules {wanted} not found in the base model. BLIP's Linear/Conv2d layers end in: {} \
             (e.g. \"self_attn.qkv\" and \"mlp.fc1\" in the vision tower, \"attention.self.query\" in the \
             text decoder); blip_peft.lora_targets(model) lists every full name.",
            suffixes.join(", ")
        )));
    }
    for (field, keys) in [
        (
            "rank_pattern",
            config.rank_pattern.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        ),
        (
            "alpha_pattern",
            config.alpha_pattern.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        ),
    ] {
        for key in keys {
            let re = Regex::new(&format!("^(.*\\.)?({key})$"))
                .map_err(|e| Error::invalid(format!("invalid regex {key:?} in {field}: {e}")))?;
            if !targeted.iter().any(|p| re.is_match(p)) {
                return Err(Error::invalid(format!(
                    "{field} key {key:?} matches none of the targeted modules; check it against \
                     blip_peft.lora_targets(model)"
                )));
            }
        }
    }
    Ok(())
}

/// Freezes the base model and makes `adapter` (and the biases `bias` names) trainable.
pub fn mark_trainable<M: LoraHost + ?Sized>(model: &mut M, adapter: &str, bias: &str) -> Result<()> {
    for (_, t) in model.named_parameters() {
        let _ = t.f_set_requires_grad(false)?;
    }
    let mut result: Result<()> = Ok(());
    model.for_each_layer(&mut |_, mut layer| {
        let bias_t = layer.bias().map(Tensor::shallow_clone);
        if let Some(slot) = layer.slot() {
            for (n, ad) in &slot.adapters {
                let on = n == adapter;
                let _ = ad.a.f_set_requires_grad(on)?;
                let _ = ad.b.f_set_requires_grad(on)?;
                if let Some(m) = &ad.magnitude {
                    let _ = m.f_set_requires_grad(on)?;
                }
            }
            if bias == "lora_only" && slot.get(adapter).is_some() {
                if let Some(b) = bias_t {
                    let _ = b.f_set_requires_grad(true)?;
                }
            }
        }
        Ok(())
    })?;
    if bias == "all" {
        for (n, t) in model.named_parameters() {
            if n.contains("bias") {
                if let Err(e) = t.f_set_requires_grad(true) {
                    result = Err(e.into());
                }
            }
        }
    }
    result?;
    // Last, as peft's wrappers freeze their originals after the bias marking.
    saved::mark_trainable(model, adapter)
}

/// Runs `f` on every layer that holds adapters.
fn for_each_slot<M: LoraHost + ?Sized>(
    model: &mut M,
    f: &mut dyn FnMut(&str, &mut LoraSlot, &Tensor) -> Result<()>,
) -> Result<()> {
    model.for_each_layer(&mut |path, mut layer| {
        let weight = layer.weight().shallow_clone();
        if let Some(slot) = layer.slot() {
            f(path, slot, &weight)?;
        }
        Ok(())
    })
}

/// The first layer under `module` (paths from `prefix`) whose active adapters draw dropout in training
/// (`lora_dropout` > 0, adapters not disabled), with that probability: what makes a tower random in training.
pub fn first_adapter_dropout(
    module: &mut dyn crate::nn::Module,
    prefix: &str,
) -> Result<Option<(String, f64)>> {
    let mut found = None;
    crate::nn::visit_adaptable(module, prefix, &mut |path, mut layer| {
        if let (None, Some(slot)) = (&found, layer.slot()) {
            if !slot.disabled {
                let p = slot
                    .active
                    .iter()
                    .filter_map(|name| slot.get(name))
                    .map(|ad| ad.dropout)
                    .fold(0.0, f64::max);
                if p > 0.0 {
                    found = Some((path.to_string(), p));
                }
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// Makes `name` the active adapter of every layer that has it (and no adapter active elsewhere).
pub fn set_active<M: LoraHost + ?Sized>(model: &mut M, name: &str) -> Result<()> {
    for_each_slot(model, &mut |_, slot, weight| {
        slot.unmerge(weight)?;
        slot.active = if slot.get(name).is_some() {
            vec![name.to_string()]
        } else {
            vec![]
        };
        Ok(())
    })?;
    saved::set_active(model, name)
}

/// Adds the active adapters' deltas into the base weights.
pub fn merge<M: LoraHost + ?Sized>(model: &mut M) -> Result<()> {
    for_each_slot(model, &mut |_, slot, weight| slot.merge(weight, None))
}

/// Takes every merged delta back out of the base weights.
pub fn unmerge<M: LoraHost + ?Sized>(model: &mut M) -> Result<()> {
    for_each_slot(model, &mut |_, slot, weight| slot.unmerge(weight))
}

/// Bypasses (or restores) every adapter; merged ones are unmerged first, so the base is exact.
pub fn set_disabled<M: LoraHost + ?Sized>(model: &mut M, disabled: bool) -> Result<()> {
    for_each_slot(model, &mut |_, slot, weight| {
        if disabled {
            slot.unmerge(weight)?;
        }
        slot.disabled = disabled;
        Ok(())
    })?;
    saved::set_disabled(model, disabled)
}

/// Removes all adapters, after merging the active ones when `merge` (peft's `merge_and_unload`/`unload`).
pub fn unload<M: LoraHost + ?Sized>(model: &mut M, merge: bool) -> Result<()> {
    model.for_each_layer(&mut |_, mut layer| {
        let weight = layer.weight().shallow_clone();
        if let Some(slot) = layer.slot() {
            slot.unmerge(&weight)?;
            if merge && !slot.disabled {
                slot.merge(&weight, None)?;
            }
        }
        *layer.adapter() = None;
        Ok(())
    })?;
    saved::unload(model)
}

/// Removes adapter `name` everywhere (unmerging it first); layers left without adapters become plain.
pub fn delete<M: LoraHost + ?Sized>(model: &mut M, name: &str) -> Result<()> {
    let mut found = false;
    model.for_each_layer(&mut |_, mut layer| {
        let weight = layer.weight().shallow_clone();
        let mut emptied = false;
        if let Some(slot) = layer.slot() {
            if slot.get(name).is_some() {
                found = true;
                slot.unmerge(&weight)?;
                slot.adapters.retain(|(n, _)| n != name);
                slot.active.retain(|n| n != name);
            }
            emptied = slot.adapters.is_empty();
        }
        if emptied {
            *layer.adapter() = None;
        }
        Ok(())
    })?;
    if !found {
        return Err(Error::invalid(format!("no adapter named {name:?}")));
    }
    saved::delete(model, name)
}

/// The names of the adapters present, in the order they were added.
pub fn adapter_names<M: LoraHost + ?Sized>(model: &mut M) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for_each_slot(model, &mut |_, slot, _| {
        for (n, _) in &slot.adapters {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        Ok(())
    })?;
    Ok(names)
}

/// peft's adapter files, in `dir`: `adapter_model.safetensors` (the tensors [`adapter_state`] gives) and
/// `adapter_config.json` (`config_json`, the config as peft writes it), each written atomically. The one
/// writer of adapter folders: `save_pretrained` and training checkpoints both call it.
pub fn save_adapter<M: LoraHost + ?Sized>(
    model: &mut M,
    dir: &std::path::Path,
    adapter: &str,
    bias: &str,
    config_json: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let tensors = adapter_state(model, adapter, bias)?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::weights::save_safetensors(&tensors, Some(metadata), &dir.join(ADAPTER_WEIGHTS_NAME))?;
    crate::weights::write_atomic(&dir.join(ADAPTER_CONFIG_NAME), config_json.as_bytes())
}

/// peft's file names in an adapter folder.
pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";

/// The tensors peft saves for `adapter`, under peft's file keys (`base_model.model.<path>.lora_A.weight`,
/// biases per the bias mode).
pub fn adapter_state<M: LoraHost + ?Sized>(
    model: &mut M,
    adapter: &str,
    bias: &str,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut lora_only_biases = Vec::new();
    for_each_slot(model, &mut |path, slot, _| {
        if let Some(ad) = slot.get(adapter) {
            out.push((
                format!("base_model.model.{path}.lora_A.weight"),
                ad.a.shallow_clone(),
            ));
            out.push((
                format!("base_model.model.{path}.lora_B.weight"),
                ad.b.shallow_clone(),
            ));
            if let Some(m) = &ad.magnitude {
                out.push((
                    format!("base_model.model.{path}.lora_magnitude_vector"),
                    m.shallow_clone(),
                ));
            }
            lora_only_biases.push(format!("{path}.base_layer.bias"));
        }
        Ok(())
    })?;
    out.extend(saved::adapter_state(model, adapter));
    if bias != "none" {
        // The biases of wrapped modules are saved with their module's copy.
        for (n, t) in model.plain_named_parameters() {
            if model
                .saved_modules()
                .iter()
                .any(|m| n.starts_with(&format!("{}.", m.path)))
            {
                continue;
            }
            let keep = match bias {
                "all" => n.contains("bias"),
                _ => lora_only_biases.contains(&n),
            };
            if keep {
                out.push((format!("base_model.model.{n}"), t));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(format!("no adapter named {adapter:?}")));
    }
    Ok(out)
}

/// The adapter's tensors paired with the file's for them. Every expected key must be present with its shape, and
/// no other key may be: a mismatch names the key. All are checked before the caller copies anything.
fn fitting_state<M: LoraHost + ?Sized>(
    model: &mut M,
    adapter: &str,
    bias: &str,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let expected = adapter_state(model, adapter, bias)?;
    let mut missing = Vec::new();
    for (key, _) in &expected {
        if !tensors.contains_key(key) {
            missing.push(key.clone());
        }
    }
    let unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.iter().any(|(e, _)| e == *k))
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        let show = |v: Vec<String>| {
            let n = v.len();
            let mut s: Vec<String> = v.into_iter().take(5).map(|k| format!("`{k}`")).collect();
            if n > 5 {
                s.push(format!("... ({n} in all)"));
            }
            s.join(", ")
        };
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("missing adapter keys: {}", show(missing)));
        }
        if !unexpected.is_empty() {
            parts.push(format!(
                "unexpected adapter keys: {}",
                show(unexpected.into_iter().cloned().collect())
            ));
        }
        return Err(Error::checkpoint(format!(
            "the adapter does not fit this model and config ({}); was it made for another base model or \
             target_modules?",
            parts.join("; ")
        )));
    }
    for (key, target) in &expected {
        let source = &tensors[key];
        if source.size() != target.size() {
            return Err(Error::checkpoint(format!(
                "adapter tensor `{key}` has shape {:?} in the file but the model expects {:?} (an adapter made \
                 for other shapes or another rank)",
                source.size(),
                target.size()
            )));
        }
    }
    Ok(expected)
}

/// Loads a peft adapter's tensors into adapter `adapter` (already injected with the matching config): copied
/// into the adapter's own tensors (in place: parameter identity kept), after checking them all.
pub fn load_adapter_state<M: LoraHost + ?Sized>(
    model: &mut M,
    adapter: &str,
    bias: &str,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let expected = fitting_state(model, adapter, bias, tensors)?;
    let _guard = tch::no_grad_guard();
    for (key, target) in expected {
        let mut t = target.shallow_clone();
        t.f_copy_(&tensors[&key].f_to_kind(t.kind())?.f_to_device(t.device())?)?;
    }
    Ok(())
}

/// peft's `hotswap_adapter`: replaces adapter `adapter`'s weights in place, on a live model, by another adapter
/// made for the same layers and ranks (`config` its adapter_config.json; `lora_alpha`, `alpha_pattern`,
/// `use_rslora` and `lora_dropout` may differ, and each layer's scaling follows them). The base is not touched
/// or reloaded, and the tensors stay the same objects. Everything is checked before anything changes, so a
/// refused swap leaves the adapter as it was.
pub fn hotswap_adapter<M: LoraHost + ?Sized>(
    model: &mut M,
    adapter: &str,
    config: &LoraConfig,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let mut merged = false;
    let mut ranks = Vec::new();
    for_each_slot(model, &mut |path, slot, _| {
        if let Some(ad) = slot.get(adapter) {
            merged |= slot.merged.iter().any(|n| n == adapter);
            let (r, _) = config.rank_alpha(path);
            if r != ad.r {
                ranks.push(format!("{path}: {} here, {r} in the new adapter", ad.r));
            }
        }
        Ok(())
    })?;
    if merged {
        return Err(Error::invalid(format!(
            "adapter {adapter:?} is merged into the base weights; call unmerge_adapter() before hot-swapping it"
        )));
    }
    if !ranks.is_empty() {
        return Err(Error::invalid(format!(
            "the new adapter's ranks differ from {adapter:?}'s, so it cannot be swapped in place ({}); load it \
             under its own name with load_adapter",
            ranks.into_iter().take(3).collect::<Vec<_>>().join("; ")
        )));
    }
    load_adapter_state(model, adapter, &config.bias, tensors)?;
    for_each_slot(model, &mut |path, slot, _| {
        if let Some((_, ad)) = slot.adapters.iter_mut().find(|(n, _)| n == adapter) {
            let (r, alpha) = config.rank_alpha(path);
            ad.alpha = alpha;
            ad.scaling = config.scaling(r, alpha);
            ad.dropout = config.lora_dropout;
        }
        Ok(())
    })
}
