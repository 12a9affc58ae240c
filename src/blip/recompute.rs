//! Gradient checkpointing by hand (tch has no checkpoint API): a tower's transformer layers run without a
//! graph keeping only their inputs, and its backward reruns them one at a time, last to first. Every layer
//! runs under a seed derived from the step's, so a rerun draws the dropout masks of its first run.

use tch::Tensor;

use crate::error::Result;

/// Runs layer `i` of a tower on its input, with the graph.
pub type LayerFn<'a> = Box<dyn Fn(usize, &Tensor) -> Result<Tensor> + 'a>;

/// A tower run by `forward_checkpointed`: what its backward needs to recompute the layers one by one.
pub struct Checkpointed<'a> {
    /// The embeddings' output, with its graph (the first layer's input).
    first: Tensor,
    /// Each layer's input, without a graph.
    inputs: Vec<Tensor>,
    /// The last layer's output as a leaf: the rest of the model's backward leaves its gradient here.
    last: Tensor,
    /// The dropout seed of the step (each layer reruns with the draws it had); without one (no dropout to
    /// repeat) the layers run under torch's generator as it is.
    seed: Option<i64>,
    /// Runs layer `i` on its input, with the graph.
    layer: LayerFn<'a>,
}

/// The RNG seed layer `i` runs under, so its recomputation draws the same dropout masks.
pub fn layer_seed(seed: i64, i: usize) -> i64 {
    seed.wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1 + i as i64)
}

impl<'a> Checkpointed<'a> {
    /// Runs `layers` layers (layer `i` is `layer(i, input)`) on the embeddings' output `first` without a
    /// graph, each under its seed, keeping their inputs. The last output is [`Self::output`].
    pub fn run(first: Tensor, layers: usize, seed: Option<i64>, layer: LayerFn<'a>) -> Result<Self> {
        let mut x = first.f_detach()?;
        let mut inputs = Vec::with_capacity(layers);
        {
            let _guard = tch::no_grad_guard();
            for i in 0..layers {
                inputs.push(x.shallow_clone());
                if let Some(seed) = seed {
                    tch::manual_seed(layer_seed(seed, i));
                }
                x = layer(i, &x)?;
            }
        }
        Ok(Self {
            first,
            inputs,
            last: x.f_detach()?.f_set_requires_grad(true)?,
            seed,
            layer,
        })
    }

    /// The last layer's output: a leaf whose gradient the rest of the backward fills in.
    pub fn output(&self) -> Tensor {
        self.last.shallow_clone()
    }

    /// Continues the backward pass through the layers, last to first, then into the embeddings. Call it
    /// after the backward of everything downstream of the tower's output.
    pub fn backward(self) -> Result<()> {
        let mut grad = self.last.f_grad()?;
        if !grad.defined() {
            return Ok(()); // nothing downstream depends on a trained weight
        }
        for (i, input) in self.inputs.iter().enumerate().rev() {
            let x = input.f_detach()?.f_set_requires_grad(true)?;
            if let Some(seed) = self.seed {
                tch::manual_seed(layer_seed(seed, i));
            }
            let y = (self.layer)(i, &x)?;
            // d(sum(y·g))/dθ = gᵀ·dy/dθ: one backward accumulates the layer's parameter gradients.
            y.f_mul(&grad)?.f_sum(y.kind())?.f_backward()?;
            grad = x.f_grad()?;
        }
        if self.first.requires_grad() {
            self.first.f_mul(&grad)?.f_sum(self.first.kind())?.f_backward()?;
        }
        Ok(())
    }
}
