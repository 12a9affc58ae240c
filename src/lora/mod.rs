//! LoRA with peft's semantics: the configuration (`adapter_config.json`), the adapter attached to a
//! Linear or Conv2d layer, and injection by module path.

pub mod config;
pub mod inject;
pub mod layer;
pub mod mixed;
pub mod saved;

pub use config::{LoraConfig, TargetModules};
pub use inject::inject;
pub use layer::{LoraAdapter, LoraSlot};

use tch::{Device, Tensor};

use crate::error::Result;
use crate::nn::saved::SavedModule;
use crate::repr::ReprNode;

/// What LoRA needs of a model (every BLIP head implements it): its adaptable layers, its parameters, the
/// modules adapters train in full, its printed tree and whether its LM head is tied.
pub trait LoraHost {
    /// Every Linear and Conv2d with its path (the layers LoRA can target).
    fn for_each_layer(&mut self, f: &mut crate::nn::LayerVisitor) -> Result<()>;
    /// Parameters under peft's names (`modules_to_save` renamed).
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// Parameters under their module paths.
    fn plain_named_parameters(&self) -> Vec<(String, Tensor)>;
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor));
    fn device(&self) -> Device;
    fn saved_modules(&self) -> &Vec<SavedModule>;
    fn saved_modules_mut(&mut self) -> &mut Vec<SavedModule>;
    fn repr_node(&self) -> ReprNode;
    /// Whether the LM head is the word embeddings (a module holding it cannot be copied).
    fn lm_head_tied(&self) -> bool;
}

/// Implements [`LoraHost`] for a head with `saved_modules` and `text_decoder` and the inherent methods of the
/// same names.
macro_rules! lora_host {
    ($model:ty) => {
        impl LoraHost for $model {
            fn for_each_layer(&mut self, f: &mut crate::nn::LayerVisitor) -> Result<()> {
                <$model>::for_each_layer(self, f)
            }
            fn named_parameters(&self) -> Vec<(String, Tensor)> {
                <$model>::named_parameters(self)
            }
            fn plain_named_parameters(&self) -> Vec<(String, Tensor)> {
                <$model>::plain_named_parameters(self)
            }
            fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
                <$model>::visit_params_mut(self, f)
            }
            fn device(&self) -> Device {
                <$model>::device(self)
            }
            fn saved_modules(&self) -> &Vec<SavedModule> {
                &self.saved_modules
            }
            fn saved_modules_mut(&mut self) -> &mut Vec<SavedModule> {
                &mut self.saved_modules
            }
            fn repr_node(&self) -> ReprNode {
                <$model>::repr_node(self)
            }
            fn lm_head_tied(&self) -> bool {
                self.text_decoder.cls.predictions.decoder.tied
            }
        }
    };
}

lora_host!(crate::blip::BlipForConditionalGeneration);
lora_host!(crate::blip::BlipForQuestionAnswering);
