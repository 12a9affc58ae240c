//! The hook adapters attach to: a dense or convolutional layer holds at most one [`Adapter`] and lets it
//! add to the layer's output, list its parameters and print itself. The layers know nothing else of adapters;
//! LoRA (`crate::lora::layer::LoraSlot`) implements the trait. [`AdapterRows`] says which adapter each row of a
//! mixed-adapter batch uses; the forward's [`ForwardContext`] carries it down to the layers.

use std::any::Any;

use tch::Tensor;

use super::context::ForwardContext;
use crate::error::Result;
use crate::repr::ReprNode;

/// peft's name for "no adapter" in `adapter_names`: the row runs the base model.
pub const BASE_ADAPTER: &str = "__base__";

/// Which adapter each row of a batch uses (peft's `adapter_names`, one per row; [`BASE_ADAPTER`] for none): the
/// distinct adapters named, and per row an index into them. Rows follow the batch: [`Self::select`] keeps and
/// reorders them as rows leave or beams are expanded, so the map is never stored on the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRows {
    names: Vec<String>,
    rows: Vec<Option<usize>>,
}

impl AdapterRows {
    /// The selection `per_row` names (`"__base__"`: the base model for that row).
    pub fn new<S: AsRef<str>>(per_row: &[S]) -> Self {
        let mut names: Vec<String> = Vec::new();
        let rows = per_row
            .iter()
            .map(|n| {
                let n = n.as_ref();
                if n == BASE_ADAPTER {
                    return None;
                }
                Some(match names.iter().position(|m| m == n) {
                    Some(i) => i,
                    None => {
                        names.push(n.to_string());
                        names.len() - 1
                    }
                })
            })
            .collect();
        Self { names, rows }
    }

    /// The distinct adapters named (not the base), in order of first appearance.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Per row: the index of its adapter in [`Self::names`], None for the base model.
    pub fn rows(&self) -> &[Option<usize>] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows `index` (old row indices, in that order; repeats allowed: beams or samples of one image).
    pub fn select(&self, index: &[i64]) -> Self {
        Self {
            names: self.names.clone(),
            rows: index.iter().map(|&i| self.rows[i as usize]).collect(),
        }
    }

    /// Each row repeated `n` times in place (`repeat_interleave`: an image's beams or returned sequences).
    pub fn repeat_each(&self, n: usize) -> Self {
        Self {
            names: self.names.clone(),
            rows: self
                .rows
                .iter()
                .flat_map(|&r| std::iter::repeat_n(r, n))
                .collect(),
        }
    }
}

/// What wraps a layer (peft's tuner layer around its `base_layer`).
pub trait Adapter: std::fmt::Debug + Send + Any {
    /// The layer's output for `x` given `result`, the base layer's own output (its weights are `weight` and
    /// `bias`), under `cx`: its `train` turns on the adapter's dropout, its `adapters` (a mixed-adapter batch)
    /// picks each row's adapter (the rows being `x`'s first dimension). `writable`: `result` is the layer's
    /// fresh output, no view and held nowhere else, so the adapter may accumulate into it in place; false for
    /// a base output kept elsewhere (the training feature cache's entries).
    fn apply(
        &self,
        x: &Tensor,
        result: Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        cx: &ForwardContext,
        writable: bool,
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
