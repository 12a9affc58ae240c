//! The layers BLIP is made of. Each knows how to read its parameters from a [`ParamSource`], run
//! forward, visit its parameters by path, and print itself the way torch prints the same module.

use tch::{Kind, Tensor};

use super::adapter::Adapter;
use super::context::ForwardContext;
use super::few_rows;
use super::module::{AdaptableLayer, Module};
use super::params::{join, Init, ParamSource};
use crate::error::Result;
use crate::repr::{py_float, ReprNode};

/// `t` in `kind`: itself when it already is (no copy), else a differentiable cast. Under mixed precision
/// the trained float32 weights (full fine-tuning, `modules_to_save`, biases) meet half-precision
/// activations; like torch's autocast, they are cast on the way in and their gradients come back in float32.
pub fn in_kind(t: &Tensor, kind: Kind) -> Result<Tensor> {
    if t.kind() == kind {
        Ok(t.shallow_clone())
    } else {
        Ok(t.f_to_kind(kind)?)
    }
}

fn in_kind_opt(t: Option<&Tensor>, kind: Kind) -> Result<Option<Tensor>> {
    t.map(|t| in_kind(t, kind)).transpose()
}

/// A layer's `weight` of `shape` (initialised N(0, `init_std`)) and its `bias` (zeros, one per output).
fn weight_and_bias(
    src: &mut dyn ParamSource,
    path: &str,
    shape: &[i64],
    init_std: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let kind = src.kind();
    let weight = src.param(&join(path, "weight"), shape, Init::Normal(init_std), kind)?;
    let bias = src.param(&join(path, "bias"), &shape[..1], Init::Zeros, kind)?;
    Ok((weight, Some(bias)))
}

/// A dense layer `y = x Wᵀ + b`, with `weight` of shape `[out, in]` (torch's layout). This is the
/// hook LoRA attaches to: with adapters, it becomes peft's `lora.Linear` around the same base weights.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_features: i64,
    pub out_features: i64,
    /// The weights are another module's (the LM head tied to the word embeddings): not visited here.
    pub tied: bool,
    /// The adapter wrapping the layer (LoRA), if any.
    pub lora: Option<Box<dyn Adapter>>,
}

impl Linear {
    pub fn load(
        src: &mut dyn ParamSource,
        path: &str,
        in_features: i64,
        out_features: i64,
        init_std: f64,
    ) -> Result<Self> {
        let (weight, bias) = weight_and_bias(src, path, &[out_features, in_features], init_std)?;
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
            tied: false,
            lora: None,
        })
    }

    /// A layer over weights owned elsewhere (shallow copies of the same tensors).
    pub fn tied_to(weight: &Tensor, bias: Option<&Tensor>) -> Self {
        let size = weight.size();
        Self {
            weight: weight.shallow_clone(),
            bias: bias.map(Tensor::shallow_clone),
            in_features: size[1],
            out_features: size[0],
            tied: true,
            lora: None,
        }
    }

    /// Inference forward (torch's kernels, no dropout).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, &ForwardContext::INFERENCE)
    }

    /// Forward under `cx`: the adapter's dropout when training, the decoding kernel when asked for.
    pub fn forward_t(&self, x: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let Some(slot) = &self.lora else {
            return self.base_forward(x, cx);
        };
        if cx.adapters.is_some() {
            // A mixed-adapter batch picks adapters by `x`'s first dimension: the rows stay as they are.
            let y = self.base_forward(x, cx)?;
            return slot.apply(x, y, &self.weight, self.bias.as_ref(), cx, false);
        }
        // Over the rows flattened to 2-D the base output is a tensor of its own, not a view of one, so the
        // adapter accumulates into it in place: no copy of the [rows, out] output per adapted layer (on the
        // vision MLP's fc1, [1154, 3072] at batch 2, those copies were ~4% of a LoRA training step).
        let size = x.size();
        let x2 = match size.len() {
            2 => x.shallow_clone(),
            _ => x.f_reshape([-1, self.in_features])?,
        };
        let y2 = self.base_forward(&x2, cx)?;
        let y2 = slot.apply(&x2, y2, &self.weight, self.bias.as_ref(), cx, true)?;
        let mut out_size = size;
        if let Some(last) = out_size.last_mut() {
            *last = self.out_features;
        }
        Ok(y2.f_reshape(out_size.as_slice())?)
    }

    /// The base layer alone, `x Wᵀ + b` in `x`'s kind: what the adapter adds to.
    pub fn base_forward(&self, x: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let kind = x.kind();
        let kernel = match cx.decoding_kernel {
            true => few_rows::linear(x, &self.weight, self.bias.as_ref())?,
            false => None,
        };
        Ok(match kernel {
            Some(y) => y,
            None => x.f_linear(
                &in_kind(&self.weight, kind)?,
                in_kind_opt(self.bias.as_ref(), kind)?.as_ref(),
            )?,
        })
    }

    /// The layer's output for `x` given `base`, [`Self::base_forward`]'s output for it (computed earlier, as
    /// the training feature cache keeps a frozen layer's): the adapter, if any, adds to it, in place when
    /// `writable` ([`crate::nn::Adapter::apply`]'s: `base` is a fresh tensor nothing else reads).
    pub fn forward_over_base(
        &self,
        x: &Tensor,
        base: Tensor,
        writable: bool,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        match &self.lora {
            Some(slot) => slot.apply(x, base, &self.weight, self.bias.as_ref(), cx, writable),
            None => Ok(base),
        }
    }

    /// Whether the base layer's weight or bias takes gradients (full fine-tuning, modules_to_save).
    pub fn base_trains(&self) -> bool {
        self.weight.requires_grad() || self.bias.as_ref().is_some_and(Tensor::requires_grad)
    }

    /// Inference into a reused buffer: `x Wᵀ + b` written over `out` (which must not need a graph) when the
    /// layer has no adapter and its weights are `x`'s kind; anything else gets a fresh [`Self::forward`].
    /// `out` is resized as needed, so one buffer serves every layer of a tower.
    pub fn forward_into(&self, x: &Tensor, out: &mut Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let plain = self.lora.is_none()
            && self.weight.kind() == x.kind()
            && self.bias.as_ref().is_none_or(|b| b.kind() == x.kind())
            && out.kind() == x.kind()
            && out.device() == x.device();
        let (Some(bias), true) = (&self.bias, plain) else {
            return self.forward_t(x, cx);
        };
        let size = x.size();
        let rows: i64 = size[..size.len() - 1].iter().product();
        let x2 = x.f_reshape([rows, self.in_features])?;
        let _ = out.f_resize_([rows, self.out_features])?;
        let _ = bias.f_addmm_out(out, &x2, &self.weight.f_tr()?)?;
        let mut out_size = size;
        *out_size.last_mut().expect("x has a feature dimension") = self.out_features;
        Ok(out.f_view(out_size.as_slice())?)
    }

    /// `x Wᵀ + b` for `x` of shape `[B, N, in]`, returned features-first, `[B, out, N]` and contiguous. Without
    /// adapters one batched GEMM (`W · xᵀ` per entry) writes that layout directly, with no transposing copy;
    /// with them (or mixed kinds) it is [`Self::forward`]'s result transposed.
    pub fn forward_features_first(&self, x: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let kind = x.kind();
        let plain = self.lora.is_none()
            && self.weight.kind() == kind
            && self.bias.as_ref().is_none_or(|b| b.kind() == kind);
        if !plain {
            return Ok(self.forward_t(x, cx)?.f_transpose(1, 2)?.f_contiguous()?);
        }
        let (b, _, _) = x.size3()?;
        let weight = self
            .weight
            .f_expand([b, self.out_features, self.in_features], false)?;
        let xt = x.f_transpose(1, 2)?;
        Ok(match &self.bias {
            Some(bias) => bias
                .f_view([1, self.out_features, 1])?
                .f_baddbmm(&weight, &xt, 1.0, 1.0)?,
            None => weight.f_bmm(&xt)?,
        })
    }

    fn base_repr(&self) -> ReprNode {
        ReprNode::leaf(
            "Linear",
            format!(
                "in_features={}, out_features={}, bias={}",
                self.in_features,
                self.out_features,
                if self.bias.is_some() { "True" } else { "False" }
            ),
        )
    }
}

/// A 2-D convolution without padding or dilation (BLIP's patch embedding: kernel = stride = patch size).
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub kernel: i64,
    pub stride: i64,
    /// The adapter wrapping the layer (LoRA), if any.
    pub lora: Option<Box<dyn Adapter>>,
}

impl Conv2d {
    pub fn load(
        src: &mut dyn ParamSource,
        path: &str,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        init_std: f64,
    ) -> Result<Self> {
        let shape = [out_channels, in_channels, kernel, kernel];
        let (weight, bias) = weight_and_bias(src, path, &shape, init_std)?;
        Ok(Self {
            weight,
            bias,
            in_channels,
            out_channels,
            kernel,
            stride,
            lora: None,
        })
    }

    /// Forward with the adapter's dropout active when `cx` trains.
    pub fn forward_t(&self, x: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let stride = [self.stride, self.stride];
        let kind = x.kind();
        let y = x.f_conv2d(
            &in_kind(&self.weight, kind)?,
            in_kind_opt(self.bias.as_ref(), kind)?.as_ref(),
            stride,
            [0, 0],
            [1, 1],
            1,
        )?;
        match &self.lora {
            Some(slot) => slot.apply(x, y, &self.weight, self.bias.as_ref(), cx, false),
            None => Ok(y),
        }
    }

    fn base_repr(&self) -> ReprNode {
        ReprNode::leaf(
            "Conv2d",
            format!(
                "{}, {}, kernel_size=({k}, {k}), stride=({s}, {s}){}",
                self.in_channels,
                self.out_channels,
                if self.bias.is_some() { "" } else { ", bias=False" },
                k = self.kernel,
                s = self.stride,
            ),
        )
    }
}

/// Layer normalisation over the last dimension, with affine weight and bias.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(src: &mut dyn ParamSource, path: &str, dim: i64, eps: f64) -> Result<Self> {
        let kind = src.kind();
        let weight = src.param(&join(path, "weight"), &[dim], Init::Ones, kind)?;
        let bias = src.param(&join(path, "bias"), &[dim], Init::Zeros, kind)?;
        Ok(Self {
            weight,
            bias,
            dim,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        Ok(x.f_layer_norm(
            [self.dim],
            Some(&in_kind(&self.weight, kind)?),
            Some(&in_kind(&self.bias, kind)?),
            self.eps,
            true,
        )?)
    }
}

/// A lookup table of embeddings. `padding_idx` rows receive no gradient, as in torch.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
    pub num_embeddings: i64,
    pub dim: i64,
    pub padding_idx: Option<i64>,
}

impl Embedding {
    pub fn load(
        src: &mut dyn ParamSource,
        path: &str,
        num_embeddings: i64,
        dim: i64,
        padding_idx: Option<i64>,
        init_std: f64,
    ) -> Result<Self> {
        let kind = src.kind();
        let weight = src.param(
            &join(path, "weight"),
            &[num_embeddings, dim],
            Init::Normal(init_std),
            kind,
        )?;
        Ok(Self {
            weight,
            num_embeddings,
            dim,
            padding_idx,
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(Tensor::f_embedding(
            &self.weight,
            ids,
            self.padding_idx.unwrap_or(-1),
            false,
            false,
        )?)
    }
}

/// Dropout, active only in training mode and only when `p > 0`.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
}

impl Dropout {
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.p > 0.0 {
            Ok(x.f_dropout(self.p, true)?)
        } else {
            Ok(x.shallow_clone())
        }
    }
}

/// The parameters of a layer adapters can wrap: its weight and bias (unless another module owns them, as the
/// tied LM head's), named `base_layer.*` once an adapter wraps it (peft's names), then the adapter's.
fn visit_wrapped(
    weight: &Tensor,
    bias: Option<&Tensor>,
    owned: bool,
    adapter: Option<&dyn Adapter>,
    f: &mut dyn FnMut(&str, &Tensor),
) {
    let base = if adapter.is_some() { "base_layer." } else { "" };
    if owned {
        f(&format!("{base}weight"), weight);
        if let Some(b) = bias {
            f(&format!("{base}bias"), b);
        }
    }
    if let Some(a) = adapter {
        a.visit(f);
    }
}

/// [`visit_wrapped`] with each tensor replaceable.
fn visit_wrapped_mut(
    weight: &mut Tensor,
    bias: Option<&mut Tensor>,
    owned: bool,
    adapter: Option<&mut dyn Adapter>,
    f: &mut dyn FnMut(&str, &mut Tensor),
) {
    let base = if adapter.is_some() { "base_layer." } else { "" };
    if owned {
        f(&format!("{base}weight"), weight);
        if let Some(b) = bias {
            f(&format!("{base}bias"), b);
        }
    }
    if let Some(a) = adapter {
        a.visit_mut(f);
    }
}

/// The layer's line, or the adapter's printout around it (peft's `lora.Linear(base_layer=...)`).
fn wrapped_repr(base: ReprNode, adapter: Option<&dyn Adapter>, base_in: i64, base_out: i64) -> ReprNode {
    match adapter {
        Some(a) => a.repr(base, base_in, base_out),
        None => base,
    }
}

/// The `Module` of a layer adapters can wrap: transformers' names (`weight`, `bias`), or peft's with adapters
/// (`base_layer.weight`, `lora_A.<name>.weight`); `$owned` says whether the weights are the layer's own.
macro_rules! wrappable_module {
    ($ty:ident, owned: |$layer:ident| $owned:expr, sizes: ($in:ident, $out:ident)) => {
        impl Module for $ty {
            fn type_name(&self) -> &str {
                stringify!($ty)
            }

            fn own_params(&self, f: &mut dyn FnMut(&str, &Tensor)) {
                let $layer = self;
                visit_wrapped(
                    &self.weight,
                    self.bias.as_ref(),
                    $owned,
                    self.lora.as_deref(),
                    f,
                );
            }

            fn own_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
                let owned = {
                    let $layer = &*self;
                    $owned
                };
                let adapter = self.lora.as_deref_mut();
                visit_wrapped_mut(&mut self.weight, self.bias.as_mut(), owned, adapter, f);
            }

            fn repr(&self) -> ReprNode {
                wrapped_repr(self.base_repr(), self.lora.as_deref(), self.$in, self.$out)
            }

            fn adaptable(&mut self) -> Option<AdaptableLayer<'_>> {
                Some(AdaptableLayer::$ty(self))
            }
        }
    };
}

wrappable_module!(Linear, owned: |layer| !layer.tied, sizes: (in_features, out_features));
wrappable_module!(Conv2d, owned: |_layer| true, sizes: (in_channels, out_channels));

crate::module!(LayerNorm: "LayerNorm" {
    params: ["weight" => weight, "bias" => bias],
    extra: describe,
});

crate::module!(Embedding: "Embedding" {
    params: ["weight" => weight],
    extra: describe,
});

crate::module!(Dropout: "Dropout" { extra: describe });

impl LayerNorm {
    /// torch's `extra_repr`.
    fn describe(&self) -> String {
        format!(
            "({},), eps={}, elementwise_affine=True",
            self.dim,
            py_float(self.eps)
        )
    }
}

impl Embedding {
    /// torch's `extra_repr`.
    fn describe(&self) -> String {
        let pad = self
            .padding_idx
            .map(|p| format!(", padding_idx={p}"))
            .unwrap_or_default();
        format!("{}, {}{pad}", self.num_embeddings, self.dim)
    }
}

impl Dropout {
    /// torch's `extra_repr`.
    fn describe(&self) -> String {
        format!("p={}, inplace=False", py_float(self.p))
    }
}
