//! What LoRA needs of a model it adapts: every BLIP head (captioning, question answering, retrieval) implements [`LoraHost`],
//! and the adapter operations of `inject.rs` and `saved.rs` are written once over it.

use tch::{Device, Tensor};

use crate::error::Result;
use crate::nn::saved::SavedModule;
use crate::nn::LayerVisitor;
use crate::repr::ReprNode;

/// A model LoRA can adapt: its layers by path, its parameters, the modules adapters train in full.
pub trait LoraHost {
    /// Every Linear and Conv2d with its module path (the layers LoRA can target), in `named_modules()` order.
    fn for_each_layer(&mut self, f: &mut LayerVisitor) -> Result<()>;
    /// Every parameter as transformers (and peft, for `modules_to_save`) names it.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// The parameters the layers hold now, under their module paths.
    fn plain_named_parameters(&self) -> Vec<(String, Tensor)>;
    /// Lets `f` replace the parameters the layers hold.
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor));
    /// The modules adapters train in full.
    fn saved_modules(&self) -> &Vec<SavedModule>;
    fn saved_modules_mut(&mut self) -> &mut Vec<SavedModule>;
    fn device(&self) -> Device;
    /// The printed module tree (peft's wrappers included).
    fn repr_node(&self) -> ReprNode;
    /// The path of a layer whose weights are another module's (the LM head tied to the word embeddings),
    /// which `modules_to_save` may not copy.
    fn tied_layer(&self) -> Option<&'static str> {
        None
    }
}

/// Implements [`LoraHost`] by the model's own methods of the same names.
macro_rules! lora_host {
    ($ty:ty $(, tied: |$m:ident| $tied:expr)?) => {
        impl LoraHost for $ty {
            fn for_each_layer(&mut self, f: &mut LayerVisitor) -> Result<()> {
                <$ty>::for_each_layer(self, f)
            }
            fn named_parameters(&self) -> Vec<(String, Tensor)> {
                <$ty>::named_parameters(self)
            }
            fn plain_named_parameters(&self) -> Vec<(String, Tensor)> {
                <$ty>::plain_named_parameters(self)
            }
            fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
                <$ty>::visit_params_mut(self, f)
            }
            fn saved_modules(&self) -> &Vec<SavedModule> {
                &self.saved_modules
            }
            fn saved_modules_mut(&mut self) -> &mut Vec<SavedModule> {
                &mut self.saved_modules
            }
            fn device(&self) -> Device {
                <$ty>::device(self)
            }
            fn repr_node(&self) -> ReprNode {
                <$ty>::repr_node(self)
            }
            $(fn tied_layer(&self) -> Option<&'static str> {
                let $m = self;
                $tied
            })?
        }
    };
}

lora_host!(crate::blip::BlipForConditionalGeneration, tied: |m| m
    .text_decoder
    .cls
    .predictions
    .decoder
    .tied
    .then_some("text_decoder.cls.predictions.decoder"));
lora_host!(crate::blip::BlipForQuestionAnswering, tied: |m| m
    .text_decoder
    .cls
    .predictions
    .decoder
    .tied
    .then_some("text_decoder.cls.predictions.decoder"));
lora_host!(crate::blip::retrieval::BlipForImageTextRetrieval);
