//! The hook adapters attach to: a dense or convolutional layer holds at most one [`Adapter`] and lets it
//! add to the layer's output, list its parameters and print itself. The layers know nothing else of adapters;
//! LoRA (`crate::lora::layer::LoraSlot`) implements the trait.

use std::any::Any;

use tch::Tensor;

use crate::error::Result;
use crate::repr::ReprNode;

/// What wraps a layer (peft's tuner layer around its `base_layer`).
pub trait Adapter: std::fmt::Debug + Send + Any {
    /// The layer's output for `x` given `result`, the base layer's own output (its weights are `weight` and
    /// `bias`); `train` turns on the adapter's dropout.
    fn apply(
        &self,
        x: &Tensor,
        result: Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor>;

    /// The adapter's parameters, by name relative to the layer.
    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor));

    /// The same parameters, replaceable.
    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor));

    /// How `print(model)` shows the wrapped layer, given the base layer's line and its sizes.
    fn repr(&self, base: ReprNode, base_in: i64, base_out: i64) -> ReprNode;

    /// The adapter as its own type (for the code that made it).
    fn as_any(&self) -> &dyn Any;

    /// The adapter as its own type, mutable.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}
