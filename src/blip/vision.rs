//! BLIP's image encoder: a pre-norm ViT (`BlipVisionModel` in transformers), from pixels to the
//! `[B, 1 + patches, D]` image embeddings that the caption decoder cross-attends to.

use tch::{Kind, Tensor};

use super::recompute::{layer_seed, Checkpointed};
use crate::config::BlipVisionConfig;
use crate::error::Result;
use crate::module;
use crate::nn::attention::{merge_heads, sdpa};
use crate::nn::{
    grad_enabled, join, visit_params, Activation, Conv2d, Dropout, ForwardContext, Init, LayerNorm, Linear,
    ParamSource,
};

/// Class token, patch embedding (a strided Conv2d) and learned position embeddings.
#[derive(Debug)]
pub struct BlipVisionEmbeddings {
    pub class_embedding: Tensor,
    pub patch_embedding: Conv2d,
    pub position_embedding: Tensor,
}

module!(BlipVisionEmbeddings: "BlipVisionEmbeddings" {
    params: ["class_embedding" => class_embedding, "position_embedding" => position_embedding],
    children: ["patch_embedding" => patch_embedding],
});

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
    fn forward(&self, pixel_values: &Tensor, kind: Kind, cx: &ForwardContext) -> Result<Tensor> {
        let b = pixel_values.size()[0];
        let patches = self
            .patch_embedding
            .forward_t(&pixel_values.f_to_kind(kind)?, cx)?; // [B, D, g, g]
        let patches = patches.f_flatten(2, -1)?.f_transpose(1, 2)?; // [B, g*g, D]
        let class = self
            .class_embedding
            .f_expand([b, 1, -1], false)?
            .f_to_kind(kind)?;
        let x = Tensor::f_cat(&[class, patches], 1)?;
        let (h, w) = (pixel_values.size()[2], pixel_values.size()[3]);
        let positions = match cx.interpolate_pos_encoding {
            true => self.interpolated_positions(x.size()[1] - 1, h, w)?,
            false => self.position_embedding.shallow_clone(),
        };
        Ok(x.f_add(&positions.f_to_kind(kind)?)?)
    }

    /// transformers' `interpolate_pos_encoding`: the patch position embeddings (a square grid) resampled
    /// bicubically (`align_corners=False`) to the `(h / patch) x (w / patch)` grid of an `h x w` image, in the
    /// embeddings' own kind, the class position first. Unchanged for a square image with the checkpoint's
    /// number of patches.
    fn interpolated_positions(&self, patches: i64, h: i64, w: i64) -> Result<Tensor> {
        let (_, positions, d) = self.position_embedding.size3()?;
        let grid = positions - 1;
        if patches == grid && h == w {
            return Ok(self.position_embedding.shallow_clone());
        }
        let side = (grid as f64).sqrt() as i64;
        let patch = self.patch_embedding.weight.size()[2];
        let class = self.position_embedding.f_narrow(1, 0, 1)?;
        let grid_embeddings = self
            .position_embedding
            .f_narrow(1, 1, grid)?
            .f_reshape([1, side, side, d])?
            .f_permute([0, 3, 1, 2])?;
        let resampled = grid_embeddings
            .f_upsample_bicubic2d([h / patch, w / patch], false, None, None)?
            .f_permute([0, 2, 3, 1])?
            .f_reshape([1, -1, d])?;
        Ok(Tensor::f_cat(&[class, resampled], 1)?)
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

module!(BlipAttention: "BlipAttention" {
    children: ["dropout" => dropout, "qkv" => qkv, "projection" => projection],
});

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

    fn forward(&self, x: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let qkv = self.qkv.forward_t(x, cx)?;
        self.attend(x, qkv, cx)
    }

    /// Inference with the query/key/value projection written into a reused buffer.
    fn forward_into(&self, x: &Tensor, qkv: &mut Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let qkv = self.qkv.forward_into(x, qkv, cx)?;
        self.attend(x, qkv, cx)
    }

    /// transformers' eager attention, returning the attention probabilities (after dropout, as transformers
    /// returns them) with the output: `softmax(q kᵀ · scale)` written out, for `output_attentions`.
    fn forward_eager(&self, x: &Tensor, cx: &ForwardContext) -> Result<(Tensor, Tensor)> {
        let qkv = self.qkv.forward_t(x, cx)?;
        let (q, k, v) = self.heads(x, qkv)?;
        let (attended, probs) = self.eager(&q, &k, &v, cx)?;
        let out = self.projection.forward_t(&merge_heads(&attended)?, cx)?;
        Ok((out, probs))
    }

    /// The fused projection `[B, L, 3·D]` of `x` split into query, key and value heads `[B, H, L, D/H]`.
    fn heads(&self, x: &Tensor, qkv: Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, d) = x.size3()?;
        let h = self.num_heads;
        let qkv = qkv.f_reshape([b, l, 3, h, d / h])?.f_permute([2, 0, 3, 1, 4])?;
        Ok((qkv.f_select(0, 0)?, qkv.f_select(0, 1)?, qkv.f_select(0, 2)?))
    }

    /// `softmax(q kᵀ · scale) v` as transformers' eager attention writes it, with the probabilities.
    fn eager(&self, q: &Tensor, k: &Tensor, v: &Tensor, cx: &ForwardContext) -> Result<(Tensor, Tensor)> {
        let scale = (q.size()[3] as f64).powf(-0.5);
        let scores = q.f_matmul(&k.f_transpose(-1, -2)?)?.f_mul_scalar(scale)?;
        let mut probs = scores.f_softmax(-1, scores.kind())?;
        if cx.train && self.dropout.p > 0.0 {
            probs = probs.f_dropout(self.dropout.p, true)?;
        }
        Ok((probs.f_matmul(v)?, probs))
    }

    fn attend(&self, x: &Tensor, qkv: Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let (q, k, v) = self.heads(x, qkv)?;
        let attended = if eager_trains_faster(&q, cx) {
            self.eager(&q, &k, &v, cx)?.0
        } else {
            let p = if cx.train { self.dropout.p } else { 0.0 };
            sdpa(&q, &k, &v, None, p, false)?
        };
        self.projection.forward_t(&merge_heads(&attended)?, cx)
    }
}

/// Whether a training step attends over `q` (bf16 under mixed precision, on a CPU without AMX) through the
/// eager matrix products rather than torch's fused kernel: there the fused kernel's bf16 path is the slower
/// (the vision self-attention, `[B, 577, 2304]` projections, forward and backward, 2-core AMD EPYC with
/// AVX-512 BF16: 67-87 ms fused against 34-39 ms eager at batch 2, 275-365 against 203-235 ms at batch 8; a
/// bf16 LoRA training step 2.7-2.8 s against 2.2-2.5 s at batch 2, 10.1-10.3 s against 8.9-9.4 s at batch 8).
/// The eager path rounds the probabilities to bf16 before the product with `v`, as autocast's does. With
/// AMX the fused kernel computes on the tile unit, and stays.
fn eager_trains_faster(q: &Tensor, cx: &ForwardContext) -> bool {
    cx.train
        && q.kind() == Kind::BFloat16
        && q.device() == tch::Device::Cpu
        && !crate::cpu::bf16_support().amx_bf16
}

/// The transformer block's two-layer MLP.
#[derive(Debug)]
pub struct BlipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub activation: Activation,
}

module!(BlipMlp: "BlipMLP" {
    children: ["activation_fn" => activation, "fc1" => fc1, "fc2" => fc2],
});

impl BlipMlp {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipVisionConfig) -> Result<Self> {
        let std = c.initializer_range;
        Ok(Self {
            activation: Activation::from_name(&c.hidden_act)?,
            fc1: Linear::load(src, &join(path, "fc1"), c.hidden_size, c.intermediate_size, std)?,
            fc2: Linear::load(src, &join(path, "fc2"), c.intermediate_size, c.hidden_size, std)?,
        })
    }

    fn forward(&self, x: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        self.fc2
            .forward_t(&self.activation.forward(&self.fc1.forward_t(x, cx)?)?, cx)
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

module!(BlipEncoderLayer: "BlipEncoderLayer" {
    children: [
        "self_attn" => self_attn,
        "layer_norm1" => layer_norm1,
        "mlp" => mlp,
        "layer_norm2" => layer_norm2,
    ],
});

impl BlipEncoderLayer {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipVisionConfig) -> Result<Self> {
        Ok(Self {
            self_attn: BlipAttention::load(src, &join(path, "self_attn"), c)?,
            layer_norm1: LayerNorm::load(src, &join(path, "layer_norm1"), c.hidden_size, c.layer_norm_eps)?,
            mlp: BlipMlp::load(src, &join(path, "mlp"), c)?,
            layer_norm2: LayerNorm::load(src, &join(path, "layer_norm2"), c.hidden_size, c.layer_norm_eps)?,
        })
    }

    fn forward(&self, x: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, cx)?
            .f_add(x)?;
        Ok(self.mlp.forward(&self.layer_norm2.forward(&h)?, cx)?.f_add(&h)?)
    }

    /// [`Self::forward`] with transformers' eager attention, also returning the attention probabilities.
    fn forward_eager(&self, x: &Tensor, cx: &ForwardContext) -> Result<(Tensor, Tensor)> {
        let (attn, probs) = self.self_attn.forward_eager(&self.layer_norm1.forward(x)?, cx)?;
        let h = attn.f_add(x)?;
        let out = self.mlp.forward(&self.layer_norm2.forward(&h)?, cx)?.f_add(&h)?;
        Ok((out, probs))
    }

    /// Inference without a graph: the residual sums and the activation are written in place, sparing three
    /// activation-sized tensors per layer. Each fresh one costs a round of page faults: glibc hands blocks
    /// this large back to the OS when they are freed (~8% of the tower's time at batch 8). `x` must be a
    /// tensor nothing else reads; the result is the same numbers as [`Self::forward`].
    fn forward_in_place(
        &self,
        mut x: Tensor,
        buffers: &mut InferenceBuffers,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward_into(&self.layer_norm1.forward(&x)?, &mut buffers.qkv, cx)?;
        let _ = x.f_add_(&attn)?;
        let mut hidden =
            self.mlp
                .fc1
                .forward_into(&self.layer_norm2.forward(&x)?, &mut buffers.hidden, cx)?;
        self.mlp.activation.forward_in_place(&mut hidden)?;
        let _ = x.f_add_(&self.mlp.fc2.forward_t(&hidden, cx)?)?;
        Ok(x)
    }
}

/// The stack of encoder blocks.
#[derive(Debug)]
pub struct BlipEncoder {
    pub layers: Vec<BlipEncoderLayer>,
}

module!(BlipEncoder: "BlipEncoder" { children: ["layers" => layers] });

/// What a forward is asked to record besides its output (an explicit argument of the call, never a model
/// setting), and which attention path it takes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Record {
    /// Every layer's input and the last layer's output (transformers' `output_hidden_states`).
    pub hidden_states: bool,
    /// Every layer's attention probabilities (transformers' `output_attentions`); implies eager attention.
    pub attentions: bool,
    /// Attention written out as transformers' eager path computes it, instead of SDPA.
    pub eager: bool,
}

/// What a recording forward collected, in layer order (empty when not asked for).
#[derive(Debug, Default)]
pub struct Recorded {
    pub hidden_states: Vec<Tensor>,
    pub attentions: Vec<Tensor>,
}

/// The whole image encoder. Its output (after `post_layernorm`) is the decoder's cross-attention memory.
#[derive(Debug)]
pub struct BlipVisionModel {
    pub embeddings: BlipVisionEmbeddings,
    pub encoder: BlipEncoder,
    pub post_layernorm: LayerNorm,
    pub config: BlipVisionConfig,
}

module!(BlipVisionModel: "BlipVisionModel" {
    children: ["embeddings" => embeddings, "encoder" => encoder, "post_layernorm" => post_layernorm],
});

impl BlipVisionModel {
    pub fn load(src: &mut dyn ParamSource, path: &str, c: &BlipVisionConfig) -> Result<Self> {
        let embeddings = BlipVisionEmbeddings::load(src, &join(path, "embeddings"), c)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| BlipEncoderLayer::load(src, &join(path, &format!("encoder.layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        let encoder = BlipEncoder { layers };
        let post_layernorm = LayerNorm::load(
            src,
            &join(path, "post_layernorm"),
            c.hidden_size,
            c.layer_norm_eps,
        )?;
        Ok(Self {
            embeddings,
            encoder,
            post_layernorm,
            config: c.clone(),
        })
    }

    /// `[B, C, H, W]` pixels to `[B, 1 + patches, D]` image embeddings. Training with a dropout seed, layer
    /// `i` runs under `layer_seed(seed, i)` (the same dropout draws as `forward_checkpointed`).
    pub fn forward(&self, pixel_values: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let mut x = self.embeddings.forward(pixel_values, self.compute_kind(cx), cx)?;
        let mut buffers = InferenceBuffers::new(&x)?;
        let seed = cx.layer_seed_base();
        for (i, layer) in self.encoder.layers.iter().enumerate() {
            if let Some(seed) = seed {
                tch::manual_seed(layer_seed(seed, i));
            }
            x = if cx.train || grad_enabled() {
                layer.forward(&x, cx)?
            } else {
                layer.forward_in_place(x, &mut buffers, cx)? // the embeddings' output and each layer's are ours alone
            };
        }
        self.post_layernorm.forward(&x)
    }

    /// [`Self::forward`] recording what `record` asks for (transformers' `output_hidden_states` /
    /// `output_attentions`): the embeddings' output and every layer's (before `post_layernorm`), and each
    /// layer's attention probabilities. Attention runs eagerly (written out) when its probabilities are
    /// asked for or `record.eager`, through SDPA otherwise.
    pub fn forward_recording(
        &self,
        pixel_values: &Tensor,
        cx: &ForwardContext,
        record: Record,
    ) -> Result<(Tensor, Recorded)> {
        let eager = record.attentions || record.eager;
        if !eager && !record.hidden_states {
            return Ok((self.forward(pixel_values, cx)?, Recorded::default()));
        }
        let mut recorded = Recorded::default();
        let mut x = self.embeddings.forward(pixel_values, self.compute_kind(cx), cx)?;
        let seed = cx.layer_seed_base();
        for (i, layer) in self.encoder.layers.iter().enumerate() {
            if record.hidden_states {
                recorded.hidden_states.push(x.shallow_clone());
            }
            if let Some(seed) = seed {
                tch::manual_seed(layer_seed(seed, i));
            }
            x = if eager {
                let (out, probs) = layer.forward_eager(&x, cx)?;
                if record.attentions {
                    recorded.attentions.push(probs);
                }
                out
            } else {
                layer.forward(&x, cx)?
            };
        }
        if record.hidden_states {
            recorded.hidden_states.push(x.shallow_clone());
        }
        Ok((self.post_layernorm.forward(&x)?, recorded))
    }

    /// Forward for gradient checkpointing: the encoder layers run without a graph, keeping only their
    /// inputs; [`Checkpointed::backward`] recomputes each layer to take its gradient. The embeddings and
    /// `post_layernorm` keep their graph.
    pub fn forward_checkpointed<'a>(
        &'a self,
        pixel_values: &Tensor,
        cx: &'a ForwardContext,
    ) -> Result<(Tensor, Checkpointed<'a>)> {
        let first = self.embeddings.forward(pixel_values, self.compute_kind(cx), cx)?;
        let layer = Box::new(move |i: usize, x: &Tensor| self.encoder.layers[i].forward(x, cx));
        let tower = Checkpointed::run(first, self.encoder.layers.len(), cx.dropout_seed, layer)?;
        let out = self.post_layernorm.forward(&tower.output())?;
        Ok((out, tower))
    }

    /// Leaves torch's global RNG as [`Self::forward`] under `cx` leaves it when the tower draws nothing (no
    /// dropout anywhere in it): seeded for its last layer. The trainer's feature cache calls it in place of a
    /// forward it skips, so what draws next (the decoder's embeddings' dropout, before its first layer
    /// reseeds) draws what it draws after the forward.
    pub fn seed_as_after_forward(&self, cx: &ForwardContext) {
        if let (Some(seed), Some(last)) = (cx.layer_seed_base(), self.encoder.layers.len().checked_sub(1)) {
            tch::manual_seed(layer_seed(seed, last));
        }
    }

    /// The largest attention dropout probability of the tower's layers (what it draws in training besides
    /// its adapters' dropout).
    pub fn attention_dropout(&self) -> f64 {
        self.encoder
            .layers
            .iter()
            .map(|l| l.self_attn.dropout.p)
            .fold(0.0, f64::max)
    }

    /// Whether any of the tower's parameters (adapters included) trains.
    pub fn has_trainable(&self) -> bool {
        let mut any = false;
        visit_params(self, "", &mut |_, t| any |= t.requires_grad());
        any
    }

    /// The kind of the tower's weights.
    pub fn kind(&self) -> Kind {
        self.embeddings.patch_embedding.weight.kind()
    }

    /// The kind the tower computes in under `cx`: its weights', or the mixed-precision kind while training.
    pub fn compute_kind(&self, cx: &ForwardContext) -> Kind {
        cx.kind(self.kind())
    }
}
