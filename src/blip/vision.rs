//! BLIP's image encoder: a pre-norm ViT (`BlipVisionModel` in transformers), from pixels to the
//! `[B, 1 + patches, D]` image embeddings that the caption decoder cross-attends to.

use tch::{Kind, Tensor};

use super::recompute::{layer_seed, Checkpointed};
use crate::config::BlipVisionConfig;
use crate::error::Result;
use crate::lora::inject::{AdaptableLayer, LayerVisitor};
use crate::nn::attention::{merge_heads, sdpa};
use crate::nn::{
    grad_enabled, join, Activation, Conv2d, Dropout, Init, LayerNorm, Linear, ParamSource, ParamVisitor,
    ParamVisitorMut,
};
use crate::repr::ReprNode;

/// Class token, patch embedding (a strided Conv2d) and learned position embeddings.
#[derive(Debug)]
pub struct BlipVisionEmbeddings {
    pub class_embedding: Tensor,
    pub patch_embedding: Conv2d,
    pub position_embedding: Tensor,
}

impl BlipVisionEmbeddings {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipVisionConfig) -> Result<Self> {
        let kind = src.kind();
        let d = c.hidden_size;
        let positions = (c.image_size / c.patch_size).pow(2) + 1;
        let std = c.initializer_range;
        let class_embedding = src.param(
            &join(path, "class_embedding"),
            &[1, 1, d],
            Init::TruncNormal(std),
            kind,
        )?;
        let position_embedding = src.param(
            &join(path, "position_embedding"),
            &[1, positions, d],
            Init::TruncNormal(std),
            kind,
        )?;
        let patch_embedding = Conv2d::load(
            src,
            &join(path, "patch_embedding"),
            c.num_channels,
            d,
            c.patch_size,
            c.patch_size,
            std,
        )?;
        Ok(Self {
            class_embedding,
            patch_embedding,
            position_embedding,
        })
    }

    /// `kind` is the tower's compute kind.
    fn forward(&self, pixel_values: &Tensor, kind: Kind, train: bool) -> Result<Tensor> {
        let b = pixel_values.size()[0];
        let patches = self
            .patch_embedding
            .forward_t(&pixel_values.f_to_kind(kind)?, train)?; // [B, D, g, g]
        let patches = patches.f_flatten(2, -1)?.f_transpose(1, 2)?; // [B, g*g, D]
        let class = self
            .class_embedding
            .f_expand([b, 1, -1], false)?
            .f_to_kind(kind)?;
        let x = Tensor::f_cat(&[class, patches], 1)?;
        Ok(x.f_add(&self.position_embedding.f_to_kind(kind)?)?)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        f(&join(path, "class_embedding"), &self.class_embedding);
        f(&join(path, "position_embedding"), &self.position_embedding);
        self.patch_embedding.visit(&join(path, "patch_embedding"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        f(&join(path, "class_embedding"), &mut self.class_embedding);
        f(&join(path, "position_embedding"), &mut self.position_embedding);
        self.patch_embedding.visit_mut(&join(path, "patch_embedding"), f);
    }

    fn repr(&self) -> ReprNode {
        ReprNode::module(
            "BlipVisionEmbeddings",
            vec![("patch_embedding", self.patch_embedding.repr())],
        )
    }
}

/// Multi-head self-attention with one fused `qkv` projection.
#[derive(Debug)]
pub struct BlipAttention {
    pub qkv: Linear,
    pub projection: Linear,
    pub dropout: Dropout,
    pub num_heads: i64,
}

impl BlipAttention {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipVisionConfig) -> Result<Self> {
        let d = c.hidden_size;
        let std = c.initializer_range;
        Ok(Self {
            dropout: Dropout {
                p: c.attention_dropout,
            },
            qkv: Linear::load(src, &join(path, "qkv"), d, 3 * d, std)?,
            projection: Linear::load(src, &join(path, "projection"), d, d, std)?,
            num_heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        self.attend(x, qkv, train)
    }

    /// Inference with the query/key/value projection written into a reused buffer.
    fn forward_into(&self, x: &Tensor, qkv: &mut Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward_into(x, qkv)?;
        self.attend(x, qkv, false)
    }

    fn attend(&self, x: &Tensor, qkv: Tensor, train: bool) -> Result<Tensor> {
        let (b, l, d) = x.size3()?;
        let h = self.num_heads;
        let qkv = qkv.f_reshape([b, l, 3, h, d / h])?.f_permute([2, 0, 3, 1, 4])?;
        let (q, k, v) = (qkv.f_select(0, 0)?, qkv.f_select(0, 1)?, qkv.f_select(0, 2)?);
        let p = if train { self.dropout.p } else { 0.0 };
        let ctx = sdpa(&q, &k, &v, None, p, false)?;
        self.projection.forward_t(&merge_heads(&ctx)?, train)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.qkv.visit(&join(path, "qkv"), f);
        self.projection.visit(&join(path, "projection"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.qkv.visit_mut(&join(path, "qkv"), f);
        self.projection.visit_mut(&join(path, "projection"), f);
    }

    fn repr(&self) -> ReprNode {
        ReprNode::module(
            "BlipAttention",
            vec![
                ("dropout", self.dropout.repr()),
                ("qkv", self.qkv.repr()),
                ("projection", self.projection.repr()),
            ],
        )
    }
}

/// The transformer block's two-layer MLP.
#[derive(Debug)]
pub struct BlipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub activation: Activation,
}

impl BlipMlp {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipVisionConfig) -> Result<Self> {
        let std = c.initializer_range;
        Ok(Self {
            activation: Activation::from_name(&c.hidden_act)?,
            fc1: Linear::load(src, &join(path, "fc1"), c.hidden_size, c.intermediate_size, std)?,
            fc2: Linear::load(src, &join(path, "fc2"), c.intermediate_size, c.hidden_size, std)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.fc2
            .forward_t(&self.activation.forward(&self.fc1.forward_t(x, train)?)?, train)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.fc1.visit(&join(path, "fc1"), f);
        self.fc2.visit(&join(path, "fc2"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.fc1.visit_mut(&join(path, "fc1"), f);
        self.fc2.visit_mut(&join(path, "fc2"), f);
    }

    fn repr(&self) -> ReprNode {
        ReprNode::module(
            "BlipMLP",
            vec![
                (
                    "activation_fn",
                    ReprNode::leaf(self.activation.repr().trim_end_matches("()"), ""),
                ),
                ("fc1", self.fc1.repr()),
                ("fc2", self.fc2.repr()),
            ],
        )
    }
}

/// Buffers the encoder layers reuse at inference for their two widest outputs (the query/key/value
/// projection and the MLP's hidden layer), so each is allocated once per forward, not once per layer.
struct InferenceBuffers {
    qkv: Tensor,
    hidden: Tensor,
}

impl InferenceBuffers {
    /// Empty buffers of `x`'s kind and device (sized by the first layer that writes them).
    fn new(x: &Tensor) -> Result<Self> {
        let empty = || Tensor::f_empty([0], (x.kind(), x.device()));
        Ok(Self {
            qkv: empty()?,
            hidden: empty()?,
        })
    }
}

/// One pre-norm encoder block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug)]
pub struct BlipEncoderLayer {
    pub self_attn: BlipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: BlipMlp,
    pub layer_norm2: LayerNorm,
}

impl BlipEncoderLayer {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipVisionConfig) -> Result<Self> {
        Ok(Self {
            self_attn: BlipAttention::load(src, &join(path, "self_attn"), c)?,
            layer_norm1: LayerNorm::load(src, &join(path, "layer_norm1"), c.hidden_size, c.layer_norm_eps)?,
            mlp: BlipMlp::load(src, &join(path, "mlp"), c)?,
            layer_norm2: LayerNorm::load(src, &join(path, "layer_norm2"), c.hidden_size, c.layer_norm_eps)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, train)?
            .f_add(x)?;
        Ok(self
            .mlp
            .forward(&self.layer_norm2.forward(&h)?, train)?
            .f_add(&h)?)
    }

    /// Inference without a graph: the residual sums and the activation are written in place, sparing three
    /// activation-sized tensors per layer. Each fresh one costs a round of page faults: glibc hands blocks
    /// this large back to the OS when they are freed (~8% of the tower's time at batch 8). `x` must be a
    /// tensor nothing else reads; the result is the same numbers as [`Self::forward`].
    fn forward_in_place(&self, mut x: Tensor, buffers: &mut InferenceBuffers) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward_into(&self.layer_norm1.forward(&x)?, &mut buffers.qkv)?;
        let _ = x.f_add_(&attn)?;
        let mut hidden = self
            .mlp
            .fc1
            .forward_into(&self.layer_norm2.forward(&x)?, &mut buffers.hidden)?;
        self.mlp.activation.forward_in_place(&mut hidden)?;
        let _ = x.f_add_(&self.mlp.fc2.forward(&hidden)?)?;
        Ok(x)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.self_attn.visit(&join(path, "self_attn"), f);
        self.layer_norm1.visit(&join(path, "layer_norm1"), f);
        self.mlp.visit(&join(path, "mlp"), f);
        self.layer_norm2.visit(&join(path, "layer_norm2"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.self_attn.visit_mut(&join(path, "self_attn"), f);
        self.layer_norm1.visit_mut(&join(path, "layer_norm1"), f);
        self.mlp.visit_mut(&join(path, "mlp"), f);
        self.layer_norm2.visit_mut(&join(path, "layer_norm2"), f);
    }

    fn repr(&self) -> ReprNode {
        ReprNode::module(
            "BlipEncoderLayer",
            vec![
                ("self_attn", self.self_attn.repr()),
                ("layer_norm1", self.layer_norm1.repr()),
                ("mlp", self.mlp.repr()),
                ("layer_norm2", self.layer_norm2.repr()),
            ],
        )
    }
}

/// The whole image encoder. Its output (after `post_layernorm`) is the decoder's cross-attention memory.
#[derive(Debug)]
pub struct BlipVisionModel {
    pub embeddings: BlipVisionEmbeddings,
    pub layers: Vec<BlipEncoderLayer>,
    pub post_layernorm: LayerNorm,
    pub config: BlipVisionConfig,
    /// The kind to compute in when it differs from the weights' (mixed-precision training sets it).
    pub compute_kind: Option<Kind>,
}

impl BlipVisionModel {
    pub fn load(src: &mut dyn ParamSource, path: &str, c: &BlipVisionConfig) -> Result<Self> {
        let embeddings = BlipVisionEmbeddings::load(src, &join(path, "embeddings"), c)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| BlipEncoderLayer::load(src, &join(path, &format!("encoder.layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::load(
            src,
            &join(path, "post_layernorm"),
            c.hidden_size,
            c.layer_norm_eps,
        )?;
        Ok(Self {
            embeddings,
            layers,
            post_layernorm,
            config: c.clone(),
            compute_kind: None,
        })
    }

    /// `[B, C, H, W]` pixels to `[B, 1 + patches, D]` image embeddings. With `seed`, layer `i` runs under
    /// `layer_seed(seed, i)` (training: the same dropout draws as `forward_checkpointed`).
    pub fn forward(&self, pixel_values: &Tensor, train: bool, seed: Option<i64>) -> Result<Tensor> {
        let mut x = self.embeddings.forward(pixel_values, self.kind(), train)?;
        let mut buffers = InferenceBuffers::new(&x)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(seed) = seed {
                tch::manual_seed(layer_seed(seed, i));
            }
            x = if train || grad_enabled() {
                layer.forward(&x, train)?
            } else {
                layer.forward_in_place(x, &mut buffers)? // the embeddings' output and each layer's are ours alone
            };
        }
        self.post_layernorm.forward(&x)
    }

    /// Forward for gradient checkpointing: the encoder layers run without a graph, keeping only their
    /// inputs; [`Checkpointed::backward`] recomputes each layer to take its gradient. The embeddings and
    /// `post_layernorm` keep their graph.
    pub fn forward_checkpointed(
        &self,
        pixel_values: &Tensor,
        train: bool,
        seed: i64,
    ) -> Result<(Tensor, Checkpointed<'_>)> {
        let first = self.embeddings.forward(pixel_values, self.kind(), train)?;
        let layer = Box::new(move |i: usize, x: &Tensor| self.layers[i].forward(x, train));
        let tower = Checkpointed::run(first, self.layers.len(), seed, layer)?;
        let out = self.post_layernorm.forward(&tower.output())?;
        Ok((out, tower))
    }

    /// Whether any of the tower's parameters (adapters included) trains.
    pub fn has_trainable(&self) -> bool {
        let mut any = false;
        self.visit("", &mut |_, t| any |= t.requires_grad());
        any
    }

    /// The kind the tower computes in: that of its weights, or the mixed-precision kind while training.
    pub fn kind(&self) -> Kind {
        self.compute_kind
            .unwrap_or_else(|| self.embeddings.patch_embedding.weight.kind())
    }

    /// Every Linear and Conv2d with its path, in transformers' `named_modules()` order.
    pub fn for_each_layer(&mut self, path: &str, f: &mut LayerVisitor) -> Result<()> {
        f(
            &join(path, "embeddings.patch_embedding"),
            AdaptableLayer::Conv2d(&mut self.embeddings.patch_embedding),
        )?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = join(path, &format!("encoder.layers.{i}"));
            f(
                &join(&p, "self_attn.qkv"),
                AdaptableLayer::Linear(&mut layer.self_attn.qkv),
            )?;
            f(
                &join(&p, "self_attn.projection"),
                AdaptableLayer::Linear(&mut layer.self_attn.projection),
            )?;
            f(&join(&p, "mlp.fc1"), AdaptableLayer::Linear(&mut layer.mlp.fc1))?;
            f(&join(&p, "mlp.fc2"), AdaptableLayer::Linear(&mut layer.mlp.fc2))?;
        }
        Ok(())
    }

    pub fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.embeddings.visit(&join(path, "embeddings"), f);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.visit(&join(path, &format!("encoder.layers.{i}")), f);
        }
        self.post_layernorm.visit(&join(path, "post_layernorm"), f);
    }

    pub fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.embeddings.visit_mut(&join(path, "embeddings"), f);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit_mut(&join(path, &format!("encoder.layers.{i}")), f);
        }
        self.post_layernorm.visit_mut(&join(path, "post_layernorm"), f);
    }

    pub fn repr(&self) -> ReprNode {
        let layers = ReprNode::list(self.layers.iter().map(BlipEncoderLayer::repr).collect());
        ReprNode::module(
            "BlipVisionModel",
            vec![
                ("embeddings", self.embeddings.repr()),
                (
                    "encoder",
                    ReprNode::module("BlipEncoder", vec![("layers", layers)]),
                ),
                ("post_layernorm", self.post_layernorm.repr()),
            ],
        )
    }
}
