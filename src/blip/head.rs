//! What every BLIP head (captioning, question answering, retrieval) shares, written once: loading a
//! checkpoint folder or random weights, the parameter walks, moves and casts in place, the printed tree and
//! saving a folder transformers loads. Each head declares its tree with `module!` and its own `build`, then
//! `blip_head!` adds these methods.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::text::BlipTextLmHeadModel;
use crate::config::BlipConfig;
use crate::error::{Error, Result};
use crate::nn::saved::SavedModule;
use crate::nn::Embedding;
use crate::weights::{save_safetensors, SafetensorsFiles, WEIGHTS_NAME};

/// The checks every head's `from_pretrained` makes of a folder before reading it: the folder itself, its
/// `config.json` (unless `config` replaces it) and its safetensors files.
pub(crate) fn open_folder(dir: &Path, config: Option<BlipConfig>) -> Result<(BlipConfig, SafetensorsFiles)> {
    if !dir.exists() {
        return Err(Error::not_found("model folder", dir));
    }
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "{} is a file; from_pretrained expects a checkpoint folder holding config.json and \
             model.safetensors",
            dir.display()
        )));
    }
    let config = match config {
        Some(c) => c,
        None => BlipConfig::from_file(&dir.join("config.json"))?,
    };
    Ok((config, SafetensorsFiles::open_folder(dir)?))
}

/// Moves every floating parameter of `params` to `device` and/or `kind` in place: the parameter objects stay
/// the same (as torch's `module.to`), so optimizers and Python references keep pointing at them.
pub(crate) fn move_params(
    params: Vec<(String, Tensor)>,
    device: Option<Device>,
    kind: Option<Kind>,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (_, t) in params {
        let mut moved = t.shallow_clone();
        if let Some(k) = kind {
            if crate::nn::is_float_kind(moved.kind()) && moved.kind() != k {
                moved = moved.f_to_kind(k)?;
            }
        }
        if let Some(d) = device {
            if moved.device() != d {
                moved = moved.f_to_device(d)?;
            }
        }
        let mut target = t.shallow_clone();
        target.f_set_data(&moved)?;
    }
    Ok(())
}

/// Writes a checkpoint folder transformers loads: `model.safetensors` (`tensors`) and `config.json` (`config`
/// with the weights' dtype, and `architecture` when given), each atomically.
pub(crate) fn save_folder(
    dir: &Path,
    tensors: &[(String, Tensor)],
    config: &BlipConfig,
    kind: Kind,
    architecture: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    save_safetensors(tensors, Some(metadata), &dir.join(WEIGHTS_NAME))?;
    let mut config = config.clone();
    config.set_raw_field("dtype", serde_json::Value::from(super::kind_name(kind)));
    if let Some(name) = architecture {
        config.set_raw_field("architectures", serde_json::json!([name]));
    }
    let text = serde_json::to_string_pretty(&config.to_json())
        .map_err(|e| Error::config(format!("cannot serialise config: {e}")))?;
    crate::weights::write_atomic(&dir.join("config.json"), format!("{text}\n").as_bytes())
}

/// The row count `V'` of a resized word-embedding table `weight` (`what`), checked: `[V' >= 1, hidden_size]`.
pub(crate) fn resized_rows(config: &BlipConfig, weight: &Tensor, what: &str) -> Result<i64> {
    let hidden = config.text_config.hidden_size;
    match weight.size()[..] {
        [v, d] if d == hidden && v >= 1 => Ok(v),
        _ => Err(Error::invalid(format!(
            "the resized {what} must have shape [new_num_tokens >= 1, {hidden}], got {:?}",
            weight.size()
        ))),
    }
}

/// Refuses a resize once adapters exist (copies of modules, a LoRA layer on the LM head: they would keep the
/// old vocabulary).
pub(crate) fn check_no_adapters(saved: &[SavedModule], head_adapted: bool) -> Result<()> {
    if !saved.is_empty() || head_adapted {
        return Err(Error::invalid(
            "resize_token_embeddings must be called before adapters are added (the LM head or a copy of a \
             module would keep the old vocabulary); resize the base model, then add the adapter",
        ));
    }
    Ok(())
}

/// Checks the LM head's resized tensors for `v` tokens: its bias `[V']`, and an untied decoder's weight and
/// bias (`decoder`: given exactly when the head is untied).
pub(crate) fn check_lm_head_resize(
    lm: &BlipTextLmHeadModel,
    saved: &[SavedModule],
    v: i64,
    bias: &Tensor,
    decoder: Option<(&Tensor, &Tensor)>,
) -> Result<()> {
    if bias.size() != [v] {
        return Err(Error::invalid(format!(
            "the resized LM-head bias must have shape [{v}], got {:?}",
            bias.size()
        )));
    }
    let head = &lm.cls.predictions;
    check_no_adapters(saved, head.decoder.lora.is_some())?;
    let d = lm.config.hidden_size;
    match (head.decoder.tied, decoder) {
        (true, Some(_)) => Err(Error::invalid("the LM head is tied: pass no decoder weights")),
        (false, None) => Err(Error::invalid("the LM head is untied: pass its resized weights")),
        (false, Some((w, b))) if w.size() != [v, d] || b.size() != [v] => Err(Error::invalid(format!(
            "the resized decoder must have weight [{v}, {d}] and bias [{v}], got {:?} and {:?}",
            w.size(),
            b.size()
        ))),
        _ => Ok(()),
    }
}

/// Replaces a parameter's data by `value` (on its device, in its kind): the parameter keeps its identity.
fn put(target: &Tensor, value: &Tensor) -> Result<()> {
    let value = value.f_to_device(target.device())?.f_to_kind(target.kind())?;
    let mut target = target.shallow_clone();
    target.f_set_data(&value)?;
    Ok(())
}

/// Gives a word-embedding table the checked rows `weight`.
pub(crate) fn resize_embedding(emb: &mut Embedding, weight: &Tensor) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let v = weight.size()[0];
    put(&emb.weight, weight)?;
    emb.num_embeddings = v;
    // transformers drops the padding index when it no longer fits the table.
    if emb.padding_idx.is_some_and(|p| p > v - 1) {
        emb.padding_idx = None;
    }
    Ok(())
}

/// Gives a decoder with its LM head the checked (see [`check_lm_head_resize`]) resized word embeddings
/// `weight`, head bias `bias` and untied `decoder`; its own config's `vocab_size` follows.
pub(crate) fn resize_lm_head(
    lm: &mut BlipTextLmHeadModel,
    weight: &Tensor,
    bias: &Tensor,
    decoder: Option<(&Tensor, &Tensor)>,
) -> Result<()> {
    resize_embedding(&mut lm.bert.embeddings.word_embeddings, weight)?;
    let _guard = tch::no_grad_guard();
    let v = weight.size()[0];
    let head = &mut lm.cls.predictions;
    put(&head.bias, bias)?;
    if let Some((w, b)) = decoder {
        put(&head.decoder.weight, w)?;
        if let Some(own) = &head.decoder.bias {
            put(own, b)?;
        }
    }
    head.decoder.out_features = v;
    lm.config.vocab_size = v;
    Ok(())
}

/// The methods every head has, over its `module!` tree, its `build`, and the fields `config`, `training`,
/// `name_or_path`, `saved_modules`, `vision_model`; `kind:` names the tower whose dtype is the model's.
macro_rules! blip_head {
    ($ty:ty, kind: $kind_of:ident) => {
        impl $ty {
            /// A freshly initialised model (transformers' initialisation scheme), seeded.
            pub fn random(
                config: $crate::config::BlipConfig,
                seed: i64,
                kind: tch::Kind,
                device: tch::Device,
            ) -> $crate::error::Result<Self> {
                let mut src = $crate::nn::RandomInit::new(seed, kind, device);
                let model = Self::build(config, &mut src)?;
                model.set_requires_grad(true)?;
                Ok(model)
            }

            /// Reads a checkpoint folder (`config.json` + safetensors weights; `config` replaces the folder's
            /// `config.json` when given) after `check` has accepted its files: weights in their stored
            /// precision unless `kind` is given, trainable, `name_or_path` the folder.
            pub(crate) fn load_folder(
                dir: &std::path::Path,
                config: Option<$crate::config::BlipConfig>,
                kind: Option<tch::Kind>,
                device: tch::Device,
                check: impl FnOnce(&$crate::weights::SafetensorsFiles) -> $crate::error::Result<()>,
            ) -> $crate::error::Result<Self> {
                let (config, files) = $crate::blip::head::open_folder(dir, config)?;
                check(&files)?;
                let kind = match kind {
                    Some(k) => k,
                    None => $crate::blip::model::stored_kind(&files)?,
                };
                let mut src = $crate::weights::CheckpointSource::new(&files, kind, device);
                let mut model = Self::build(config, &mut src)?;
                src.finish()?;
                model.set_requires_grad(true)?;
                model.name_or_path = dir.to_string_lossy().into_owned();
                Ok(model)
            }

            /// Every parameter in transformers' `named_parameters()` order, tied ones once; the modules
            /// adapters train in full appear as peft names them (`<path>.original_module.*`,
            /// `<path>.modules_to_save.*`).
            pub fn named_parameters(&self) -> Vec<(String, tch::Tensor)> {
                $crate::nn::saved::rename(&self.saved_modules, self.plain_named_parameters())
            }

            /// The parameters the layers hold now, under their module paths (no `modules_to_save` renaming).
            pub fn plain_named_parameters(&self) -> Vec<(String, tch::Tensor)> {
                let mut out = Vec::new();
                $crate::nn::visit_params(self, "", &mut |name, t| {
                    out.push((name.to_string(), t.shallow_clone()))
                });
                out
            }

            /// Lets `f` replace the parameters the layers hold (the same ones `plain_named_parameters` lists).
            pub fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut tch::Tensor)) {
                $crate::nn::visit_params_mut(self, "", f);
            }

            /// Every Linear and Conv2d with its path (the layers LoRA can target).
            pub fn for_each_layer(&mut self, f: &mut $crate::nn::LayerVisitor) -> $crate::error::Result<()> {
                $crate::nn::visit_adaptable(self, "", f)
            }

            /// Sets `requires_grad` on every parameter.
            pub fn set_requires_grad(&self, flag: bool) -> $crate::error::Result<()> {
                for (_, t) in self.named_parameters() {
                    let _ = t.f_set_requires_grad(flag)?;
                }
                Ok(())
            }

            pub fn device(&self) -> tch::Device {
                self.vision_model.embeddings.patch_embedding.weight.device()
            }

            pub fn kind(&self) -> tch::Kind {
                self.$kind_of.kind()
            }

            /// Moves every floating parameter to `device` and/or `kind` in place: the parameter objects stay
            /// the same (as torch's `module.to`), so optimizers and Python references keep pointing at them.
            pub fn to(
                &self,
                device: Option<tch::Device>,
                kind: Option<tch::Kind>,
            ) -> $crate::error::Result<()> {
                $crate::blip::head::move_params(self.named_parameters(), device, kind)
            }

            /// The torch-style module tree, with peft's wrappers around the modules adapters train in full.
            pub fn repr_node(&self) -> $crate::repr::ReprNode {
                let mut root = $crate::nn::Module::repr(self);
                $crate::nn::saved::wrap_repr(&self.saved_modules, &mut root);
                root
            }

            /// What `print(model)` shows.
            pub fn repr(&self) -> String {
                self.repr_node().render()
            }
        }
    };
}
pub(crate) use blip_head;
