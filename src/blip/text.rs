//! BLIP's caption decoder: a post-norm BERT with causal self-attention, cross-attention to the image
//! embeddings and a tied LM head (`BlipTextLMHeadModel` in transformers).

use tch::{Kind, Tensor};

use super::recompute::{layer_seed, Checkpointed};
use crate::config::BlipTextConfig;
use crate::error::Result;
use crate::lora::inject::{AdaptableLayer, LayerVisitor};
use crate::nn::attention::{merge_heads, sdpa, split_heads};
use crate::nn::{
    in_kind, join, Activation, Dropout, Embedding, Init, LayerNorm, Linear, ParamSource, ParamVisitor,
    ParamVisitorMut,
};
use crate::repr::ReprNode;

/// Keys and values one decoder layer keeps between decoding steps.
#[derive(Debug)]
pub struct LayerCache {
    /// Self-attention keys/values, preallocated for the whole decode: `[rows, H, max_len, D]`.
    pub k: Tensor,
    pub v: Tensor,
    /// Cross-attention keys/values of the image embeddings, computed once per image.
    pub cross_kv: Option<ImageKeysValues>,
}

/// One cross-attention layer's image keys/values, kept for a whole `generate` call. For float32 on the CPU
/// they are stored features-first, `[images, H, D, N]`, the layout decoding reads fastest: a step's scores
/// and context are then two batched matrix products that stream memory in order (~1.6x faster than
/// `scaled_dot_product_attention` over the projections' strided views at batch 8), and the projections
/// write that layout directly (no transposing copy). Half precision, and CUDA, keep `[images, H, N, D]` for
/// the fused SDPA kernels, which also keep transformers' rounding (they accumulate in float32).
#[derive(Debug)]
pub enum ImageKeysValues {
    FeaturesFirst { keys: Tensor, values: Tensor },
    Heads { keys: Tensor, values: Tensor },
}

impl ImageKeysValues {
    /// The keys/values of `attn` (a cross-attention block) over the image embeddings `image`, `[images, N, C]`.
    fn new(attn: &BlipTextSelfAttention, image: &Tensor) -> Result<Self> {
        if image.kind() == Kind::Float && image.device() == tch::Device::Cpu {
            let (images, n, _) = image.size3()?;
            let h = attn.num_heads;
            let heads = |t: Tensor| -> Result<Tensor> {
                let d = t.size()[1] / h;
                Ok(t.f_view([images, h, d, n])?)
            };
            return Ok(Self::FeaturesFirst {
                keys: heads(attn.key.forward_features_first(image)?)?,
                values: heads(attn.value.forward_features_first(image)?)?,
            });
        }
        let (keys, values) = attn.key_value(image, false)?;
        Ok(Self::Heads {
            keys: keys.f_contiguous()?,
            values: values.f_contiguous()?,
        })
    }

    fn images(&self) -> i64 {
        match self {
            Self::FeaturesFirst { values, .. } | Self::Heads { values, .. } => values.size()[0],
        }
    }

    /// The images `index` (an index into dimension 0), in that order.
    fn select(&self, index: &Tensor) -> Result<Self> {
        Ok(match self {
            Self::FeaturesFirst { keys, values } => Self::FeaturesFirst {
                keys: keys.f_index_select(0, index)?,
                values: values.f_index_select(0, index)?,
            },
            Self::Heads { keys, values } => Self::Heads {
                keys: keys.f_index_select(0, index)?,
                values: values.f_index_select(0, index)?,
            },
        })
    }

    /// `softmax(q kᵀ / √D) v` for `q` of shape `[images, H, Q, D]` (no mask: every image position counts).
    fn attend(&self, q: &Tensor) -> Result<Tensor> {
        let (keys, values) = match self {
            Self::Heads { keys, values } => return sdpa(q, keys, values, None, 0.0, false),
            Self::FeaturesFirst { keys, values } => (keys, values),
        };
        let (images, h, queries, d) = q.size4()?;
        let n = keys.size()[3];
        // 1/√D is a power of two for the usual head sizes, so scaling q first changes no bits.
        let q = q
            .f_mul_scalar(1.0 / (d as f64).sqrt())?
            .f_reshape([images * h, queries, d])?;
        let scores = q.f_bmm(&keys.f_view([images * h, d, n])?)?;
        let probs = scores.f_softmax(-1, scores.kind())?;
        let values = values.f_view([images * h, d, n])?.f_transpose(1, 2)?; // BLAS reads it transposed
        Ok(probs.f_bmm(&values)?.f_view([images, h, queries, d])?)
    }
}

/// How the rows of a decoding batch share the image keys/values in cross-attention. Rows are sorted by image;
/// an image's rows are stacked as extra query positions of that image, so its keys/values are never copied.
#[derive(Debug)]
pub enum CrossLayout {
    /// Every `n` consecutive rows belong to one image (beams, or samples of an image): the stacking is a view.
    Uniform(i64),
    /// Images with different numbers of rows (some rows finished): row `r`'s query goes to slot `slots[r]` of a
    /// zero-padded `[images * group]` buffer, `group` being the largest number of rows of an image.
    Padded { slots: Tensor, group: i64 },
}

/// The decoder's cache for one `generate` call. Rows are grouped by image (beams or samples of the same image
/// next to each other); the image keys/values are shared by the rows of an image, never copied.
#[derive(Debug)]
pub struct DecoderCache {
    pub layers: Vec<LayerCache>,
    /// Positions filled so far.
    pub len: i64,
    /// The image of each row (an index into the image keys/values), ascending.
    row_image: Vec<i64>,
    layout: CrossLayout,
}

impl DecoderCache {
    /// The image (an index into the image keys/values) of each row.
    pub fn row_image(&self) -> &[i64] {
        &self.row_image
    }

    /// Keeps the rows `rows` (old row indices; they may also reorder beams), new row `r` belonging to the old
    /// image `row_image[r]` (ascending). Images left without rows drop their keys/values; returns the old
    /// indices of the images kept when some were dropped.
    pub fn select_rows(&mut self, rows: &Tensor, row_image: &[i64]) -> Result<Option<Tensor>> {
        self.reorder(rows)?;
        let mut images: Vec<i64> = row_image.to_vec();
        images.dedup();
        let before = self.row_image.last().map_or(0, |&i| i + 1);
        let kept = if (images.len() as i64) < before {
            let index = Tensor::f_from_slice(&images)?.f_to_device(rows.device())?;
            for layer in &mut self.layers {
                if let Some(kv) = &layer.cross_kv {
                    layer.cross_kv = Some(kv.select(&index)?);
                }
            }
            Some(index)
        } else {
            None
        };
        // Renumber the images 0.. in the order kept.
        let mut renumbered = Vec::with_capacity(row_image.len());
        let mut next = -1;
        let mut last = None;
        for &i in row_image {
            if last != Some(i) {
                next += 1;
                last = Some(i);
            }
            renumbered.push(next);
        }
        self.row_image = renumbered;
        self.layout = Self::layout_of(&self.row_image, rows.device())?;
        Ok(kept)
    }

    /// Reorders the rows within their images (beam search): row `i` takes the keys/values of row `index[i]`.
    pub fn reorder(&mut self, index: &Tensor) -> Result<()> {
        for layer in &mut self.layers {
            layer.k = layer.k.f_index_select(0, index)?;
            layer.v = layer.v.f_index_select(0, index)?;
        }
        Ok(())
    }

    /// The cross-attention layout of rows whose images are `row_image` (ascending, numbered from 0).
    fn layout_of(row_image: &[i64], device: tch::Device) -> Result<CrossLayout> {
        // Each row's rank among its image's rows.
        let mut ranks = Vec::with_capacity(row_image.len());
        for (r, &i) in row_image.iter().enumerate() {
            let rank = match ranks.last() {
                Some(&prev) if row_image[r - 1] == i => prev + 1,
                _ => 0,
            };
            ranks.push(rank);
        }
        let group = ranks.iter().max().map_or(1, |&m| m + 1);
        let images = row_image.last().map_or(0, |&i| i + 1);
        if ranks.len() as i64 == images * group {
            return Ok(CrossLayout::Uniform(group));
        }
        let slots: Vec<i64> = row_image
            .iter()
            .zip(&ranks)
            .map(|(&i, &rank)| i * group + rank)
            .collect();
        Ok(CrossLayout::Padded {
            slots: Tensor::f_from_slice(&slots)?.f_to_device(device)?,
            group,
        })
    }
}

/// Word and position embeddings, layer-normalised (no token types in BLIP).
#[derive(Debug)]
pub struct BlipTextEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

impl BlipTextEmbeddings {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipTextConfig) -> Result<Self> {
        let std = c.initializer_range;
        Ok(Self {
            word_embeddings: Embedding::load(
                src,
                &join(path, "word_embeddings"),
                c.vocab_size,
                c.hidden_size,
                Some(c.pad_token_id),
                std,
            )?,
            position_embeddings: Embedding::load(
                src,
                &join(path, "position_embeddings"),
                c.max_position_embeddings,
                c.hidden_size,
                None,
                std,
            )?,
            layer_norm: LayerNorm::load(src, &join(path, "LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
            dropout: Dropout {
                p: c.hidden_dropout_prob,
            },
        })
    }

    /// `positions` is `[T]` (the same for every row) or `[B, T]` (per row, for left-padded prompts).
    /// `kind` is the decoder's compute kind.
    fn forward(&self, input_ids: &Tensor, positions: &Tensor, kind: Kind, train: bool) -> Result<Tensor> {
        let x = in_kind(&self.word_embeddings.forward(input_ids)?, kind)?
            .f_add(&in_kind(&self.position_embeddings.forward(positions)?, kind)?)?;
        self.dropout.forward(&self.layer_norm.forward(&x)?, train)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.word_embeddings.visit(&join(path, "word_embeddings"), f);
        self.position_embeddings
            .visit(&join(path, "position_embeddings"), f);
        self.layer_norm.visit(&join(path, "LayerNorm"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.word_embeddings.visit_mut(&join(path, "word_embeddings"), f);
        self.position_embeddings
            .visit_mut(&join(path, "position_embeddings"), f);
        self.layer_norm.visit_mut(&join(path, "LayerNorm"), f);
    }

    fn repr(&self) -> ReprNode {
        ReprNode::module(
            "BlipTextEmbeddings",
            vec![
                ("word_embeddings", self.word_embeddings.repr()),
                ("position_embeddings", self.position_embeddings.repr()),
                ("LayerNorm", self.layer_norm.repr()),
                ("dropout", self.dropout.repr()),
            ],
        )
    }
}

/// Query/key/value projections of one attention block (`attention.self` or `crossattention.self`).
#[derive(Debug)]
pub struct BlipTextSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub dropout: Dropout,
    pub num_heads: i64,
}

impl BlipTextSelfAttention {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipTextConfig, kv_width: i64) -> Result<Self> {
        let d = c.hidden_size;
        let std = c.initializer_range;
        Ok(Self {
            query: Linear::load(src, &join(path, "query"), d, d, std)?,
            key: Linear::load(src, &join(path, "key"), kv_width, d, std)?,
            value: Linear::load(src, &join(path, "value"), kv_width, d, std)?,
            dropout: Dropout {
                p: c.attention_probs_dropout_prob,
            },
            num_heads: c.num_attention_heads,
        })
    }

    /// Keys and values of `states`, split into heads.
    pub fn key_value(&self, states: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.key.forward_t(states, train)?, self.num_heads)?,
            split_heads(&self.value.forward_t(states, train)?, self.num_heads)?,
        ))
    }

    /// Attention of `hidden` over `kv`, with an additive `mask` or a plain causal one.
    fn attend(
        &self,
        hidden: &Tensor,
        kv: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        train: bool,
    ) -> Result<Tensor> {
        let q = split_heads(&self.query.forward_t(hidden, train)?, self.num_heads)?;
        let p = if train { self.dropout.p } else { 0.0 };
        merge_heads(&sdpa(&q, &kv.0, &kv.1, mask, p, causal)?)
    }

    /// Cross-attention of `hidden`'s rows over their images' keys/values (`kv` has one entry per image): an
    /// image's rows are stacked as extra query positions of that image, so its keys/values are never copied.
    fn attend_shared(
        &self,
        hidden: &Tensor,
        kv: &ImageKeysValues,
        layout: &CrossLayout,
        train: bool,
    ) -> Result<Tensor> {
        let q = split_heads(&self.query.forward_t(hidden, train)?, self.num_heads)?; // [R, H, T, D]
        let (_, h, t, d) = q.size4()?;
        let images = kv.images();
        // Every image gets `group` query slots: a view when all images have as many rows, else a padded copy
        // (the padding costs only attention scores, which are cheap next to the rows' projections and MLP).
        let (q, group) = match layout {
            CrossLayout::Uniform(n) => (q, *n),
            CrossLayout::Padded { slots, group } => {
                let mut padded = Tensor::f_zeros([images * group, h, t, d], (q.kind(), q.device()))?;
                let _ = padded.f_index_copy_(0, slots, &q)?;
                (padded, *group)
            }
        };
        let q = q
            .f_view([images, group, h, t, d])?
            .f_permute([0, 2, 1, 3, 4])?
            .f_reshape([images, h, group * t, d])?;
        // No attention dropout: the cache only serves generation.
        let ctx = kv.attend(&q)?; // [images, H, group*T, D]
        let ctx = ctx
            .f_view([images, h, group, t, d])?
            .f_permute([0, 2, 1, 3, 4])?
            .f_reshape([images * group, h, t, d])?;
        let ctx = match layout {
            CrossLayout::Padded { slots, .. } => ctx.f_index_select(0, slots)?,
            CrossLayout::Uniform(_) => ctx,
        };
        merge_heads(&ctx)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.query.visit(&join(path, "query"), f);
        self.key.visit(&join(path, "key"), f);
        self.value.visit(&join(path, "value"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.query.visit_mut(&join(path, "query"), f);
        self.key.visit_mut(&join(path, "key"), f);
        self.value.visit_mut(&join(path, "value"), f);
    }

    fn repr(&self) -> ReprNode {
        ReprNode::module(
            "BlipTextSelfAttention",
            vec![
                ("query", self.query.repr()),
                ("key", self.key.repr()),
                ("value", self.value.repr()),
                ("dropout", self.dropout.repr()),
            ],
        )
    }
}

/// `LayerNorm(dropout(dense(h)) + residual)`: the post-norm residual of BERT (`*.output`).
#[derive(Debug)]
pub struct BlipTextResidualOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
    type_name: &'static str,
}

impl BlipTextResidualOutput {
    fn load(
        src: &mut dyn ParamSource,
        path: &str,
        c: &BlipTextConfig,
        in_features: i64,
        type_name: &'static str,
    ) -> Result<Self> {
        Ok(Self {
            dense: Linear::load(
                src,
                &join(path, "dense"),
                in_features,
                c.hidden_size,
                c.initializer_range,
            )?,
            layer_norm: LayerNorm::load(src, &join(path, "LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
            dropout: Dropout {
                p: c.hidden_dropout_prob,
            },
            type_name,
        })
    }

    fn forward(&self, h: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.dropout.forward(&self.dense.forward_t(h, train)?, train)?;
        self.layer_norm.forward(&h.f_add(residual)?)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.dense.visit(&join(path, "dense"), f);
        self.layer_norm.visit(&join(path, "LayerNorm"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.dense.visit_mut(&join(path, "dense"), f);
        self.layer_norm.visit_mut(&join(path, "LayerNorm"), f);
    }

    fn repr(&self) -> ReprNode {
        ReprNode::module(
            self.type_name,
            vec![
                ("dense", self.dense.repr()),
                ("LayerNorm", self.layer_norm.repr()),
                ("dropout", self.dropout.repr()),
            ],
        )
    }
}

/// An attention block with its output projection (`attention` or `crossattention`).
#[derive(Debug)]
pub struct BlipTextAttention {
    pub self_: BlipTextSelfAttention,
    pub output: BlipTextResidualOutput,
}

impl BlipTextAttention {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipTextConfig, kv_width: i64) -> Result<Self> {
        Ok(Self {
            self_: BlipTextSelfAttention::load(src, &join(path, "self"), c, kv_width)?,
            output: BlipTextResidualOutput::load(
                src,
                &join(path, "output"),
                c,
                c.hidden_size,
                "BlipTextSelfOutput",
            )?,
        })
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.self_.visit(&join(path, "self"), f);
        self.output.visit(&join(path, "output"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.self_.visit_mut(&join(path, "self"), f);
        self.output.visit_mut(&join(path, "output"), f);
    }

    fn repr(&self) -> ReprNode {
        ReprNode::module(
            "BlipTextAttention",
            vec![("self", self.self_.repr()), ("output", self.output.repr())],
        )
    }
}

/// One decoder block: causal self-attention, cross-attention to the image, feed-forward.
#[derive(Debug)]
pub struct BlipTextLayer {
    pub attention: BlipTextAttention,
    pub crossattention: Option<BlipTextAttention>,
    pub intermediate: Linear,
    pub intermediate_act: Activation,
    pub output: BlipTextResidualOutput,
}

/// What one forward pass of the decoder attends with.
pub struct DecoderMasks<'a> {
    /// Additive self-attention mask `[B, 1, T, S]`, or `None` for a plain causal (or, with a cache, full) mask.
    pub self_mask: Option<&'a Tensor>,
    /// Whether SDPA should apply causality itself (no explicit mask, no cached past).
    pub causal: bool,
}

impl BlipTextLayer {
    fn load(src: &mut dyn ParamSource, path: &str, c: &BlipTextConfig) -> Result<Self> {
        let crossattention = if c.is_decoder {
            Some(BlipTextAttention::load(
                src,
                &join(path, "crossattention"),
                c,
                c.encoder_hidden_size,
            )?)
        } else {
            None
        };
        Ok(Self {
            attention: BlipTextAttention::load(src, &join(path, "attention"), c, c.hidden_size)?,
            crossattention,
            intermediate: Linear::load(
                src,
                &join(path, "intermediate.dense"),
                c.hidden_size,
                c.intermediate_size,
                c.initializer_range,
            )?,
            intermediate_act: Activation::from_name(&c.hidden_act)?,
            output: BlipTextResidualOutput::load(
                src,
                &join(path, "output"),
                c,
                c.intermediate_size,
                "BlipTextOutput",
            )?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        image: &Tensor,
        masks: &DecoderMasks,
        cache: Option<(&mut LayerCache, i64, &CrossLayout)>,
        train: bool,
    ) -> Result<Tensor> {
        let attn = &self.attention.self_;
        let mut cache = cache;
        let self_kv = match &mut cache {
            Some((cache, pos, _)) => {
                // Write this step's keys/values into the preallocated buffers, attend over all filled positions.
                let (k, v) = attn.key_value(x, train)?;
                let t = k.size()[2];
                cache.k.f_narrow(2, *pos, t)?.f_copy_(&k)?;
                cache.v.f_narrow(2, *pos, t)?.f_copy_(&v)?;
                (
                    cache.k.f_narrow(2, 0, *pos + t)?,
                    cache.v.f_narrow(2, 0, *pos + t)?,
                )
            }
            None => attn.key_value(x, train)?,
        };
        let h = attn.attend(x, &self_kv, masks.self_mask, masks.causal, train)?;
        let mut x = self.attention.output.forward(&h, x, train)?;
        if let Some(ca) = &self.crossattention {
            let h = match cache {
                Some((cache, _, layout)) => {
                    let kv = match cache.cross_kv.take() {
                        Some(kv) => kv,
                        None => ImageKeysValues::new(&ca.self_, image)?,
                    };
                    let h = ca.self_.attend_shared(&x, &kv, layout, train)?;
                    cache.cross_kv = Some(kv);
                    h
                }
                None => {
                    let kv = ca.self_.key_value(image, train)?;
                    ca.self_.attend(&x, &kv, None, false, train)?
                }
            };
            x = ca.output.forward(&h, &x, train)?;
        }
        let h = self
            .intermediate_act
            .forward(&self.intermediate.forward_t(&x, train)?)?;
        self.output.forward(&h, &x, train)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.attention.visit(&join(path, "attention"), f);
        if let Some(ca) = &self.crossattention {
            ca.visit(&join(path, "crossattention"), f);
        }
        self.intermediate.visit(&join(path, "intermediate.dense"), f);
        self.output.visit(&join(path, "output"), f);
    }

    fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        self.attention.visit_mut(&join(path, "attention"), f);
        if let Some(ca) = &mut self.crossattention {
            ca.visit_mut(&join(path, "crossattention"), f);
        }
        self.intermediate.visit_mut(&join(path, "intermediate.dense"), f);
        self.output.visit_mut(&join(path, "output"), f);
    }

    fn repr(&self) -> ReprNode {
        let mut children = vec![("attention", self.attention.repr())];
        if let Some(ca) = &self.crossattention {
            children.push(("crossattention", ca.repr()));
        }
        children.push((
            "intermediate",
            ReprNode::module(
                "BlipTextIntermediate",
                vec![
                    ("dense", self.intermediate.repr()),
                    (
                        "intermediate_act_fn",
                        ReprNode::leaf(self.intermediate_act.repr().trim_end_matches("()"), ""),
                    ),
                ],
            ),
        ));
        children.push(("output", self.output.repr()));
        ReprNode::module("BlipTextLayer", children)
    }
}

/// The LM head: `decoder(LayerNorm(act(dense(h))))`, whose decoder weight is usually the word embeddings.
#[derive(Debug)]
pub struct BlipTextLmHead {
    pub transform_dense: Linear,
    pub transform_act: Activation,
    pub transform_layer_norm: LayerNorm,
    /// `cls.predictions.bias`: the decoder's bias when tied (and an unused parameter when untied, as in transformers).
    pub bias: Tensor,
    /// `cls.predictions.decoder`: over the word embeddings and `bias` when tied, its own weights otherwise.
    pub decoder: Linear,
}

/// The caption decoder with its LM head (`text_decoder`).
#[derive(Debug)]
pub struct BlipTextLmHeadModel {
    pub embeddings: BlipTextEmbeddings,
    pub layers: Vec<BlipTextLayer>,
    pub head: BlipTextLmHead,
    pub config: BlipTextConfig,
    /// The kind to compute in when it differs from the weights' (mixed-precision training sets it).
    pub compute_kind: Option<Kind>,
}

impl BlipTextLmHeadModel {
    pub fn load(src: &mut dyn ParamSource, path: &str, c: &BlipTextConfig, tied: bool) -> Result<Self> {
        let bert = join(path, "bert");
        let embeddings = BlipTextEmbeddings::load(src, &join(&bert, "embeddings"), c)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| BlipTextLayer::load(src, &join(&bert, &format!("encoder.layer.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        let pred = join(path, "cls.predictions");
        let kind = src.kind();
        let bias = src.param(&join(&pred, "bias"), &[c.vocab_size], Init::Zeros, kind)?;
        let transform_dense = Linear::load(
            src,
            &join(&pred, "transform.dense"),
            c.hidden_size,
            c.hidden_size,
            c.initializer_range,
        )?;
        let transform_layer_norm = LayerNorm::load(
            src,
            &join(&pred, "transform.LayerNorm"),
            c.hidden_size,
            c.layer_norm_eps,
        )?;
        let decoder = if tied {
            // Older checkpoints store the tied copies too; they are the same numbers.
            src.ignore(&join(&pred, "decoder.weight"));
            src.ignore(&join(&pred, "decoder.bias"));
            Linear::tied_to(&embeddings.word_embeddings.weight, Some(&bias))
        } else {
            Linear::load(
                src,
                &join(&pred, "decoder"),
                c.hidden_size,
                c.vocab_size,
                c.initializer_range,
            )?
        };
        src.ignore(&join(&bert, "embeddings.position_ids"));
        let head = BlipTextLmHead {
            transform_dense,
            transform_act: Activation::from_name(&c.hidden_act)?,
            transform_layer_norm,
            bias,
            decoder,
        };
        Ok(Self {
            embeddings,
            layers,
            head,
            config: c.clone(),
            compute_kind: None,
        })
    }

    /// Decoder hidden states `[B, T, D]` for `input_ids` `[B, T]` attending to `image` `[B, N, Dv]`
    /// (training and scoring: positions 0..T, no cache). With `seed`, layer `i` runs under
    /// `layer_seed(seed, i)` (training: the same dropout draws as `hidden_states_checkpointed`).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        image: &Tensor,
        masks: &DecoderMasks,
        train: bool,
        seed: Option<i64>,
    ) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let positions = Tensor::f_arange(t, (Kind::Int64, input_ids.device()))?;
        let mut x = self
            .embeddings
            .forward(input_ids, &positions, self.kind(), train)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(seed) = seed {
                tch::manual_seed(layer_seed(seed, i));
            }
            x = layer.forward(&x, image, masks, None, train)?;
        }
        Ok(x)
    }

    /// `hidden_states` for gradient checkpointing (see `BlipVisionModel::forward_checkpointed`). `image` must
    /// be a leaf: the layers' recomputations accumulate its gradient there.
    pub fn hidden_states_checkpointed<'a>(
        &'a self,
        input_ids: &Tensor,
        image: &'a Tensor,
        masks: &'a DecoderMasks<'a>,
        train: bool,
        seed: i64,
    ) -> Result<(Tensor, Checkpointed<'a>)> {
        let t = input_ids.size()[1];
        let positions = Tensor::f_arange(t, (Kind::Int64, input_ids.device()))?;
        let first = self
            .embeddings
            .forward(input_ids, &positions, self.kind(), train)?;
        let layer =
            Box::new(move |i: usize, x: &Tensor| self.layers[i].forward(x, image, masks, None, train));
        let tower = Checkpointed::run(first, self.layers.len(), seed, layer)?;
        Ok((tower.output(), tower))
    }

    /// One decoding step: hidden states of the new tokens `input_ids` `[R, T]` at `positions` (`[T]` or
    /// `[R, T]`), appending their keys/values to `cache`. `image` holds one row per image.
    pub fn decode_step(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        image: &Tensor,
        masks: &DecoderMasks,
        cache: &mut DecoderCache,
    ) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let mut x = self
            .embeddings
            .forward(input_ids, positions, self.kind(), false)?;
        let pos = cache.len;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, image, masks, Some((layer_cache, pos, &cache.layout)), false)?;
        }
        cache.len += t;
        Ok(x)
    }

    /// An empty cache for `rows` rows (`per_image` per image) and up to `max_len` positions.
    pub fn new_cache(&self, rows: i64, per_image: i64, max_len: i64) -> Result<DecoderCache> {
        let c = &self.config;
        let heads = c.num_attention_heads;
        let head_dim = c.hidden_size / heads;
        let opts = (self.kind(), self.embeddings.word_embeddings.weight.device());
        let layers = (0..self.layers.len())
            .map(|_| {
                Ok(LayerCache {
                    k: Tensor::f_zeros([rows, heads, max_len, head_dim], opts)?,
                    v: Tensor::f_zeros([rows, heads, max_len, head_dim], opts)?,
                    cross_kv: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderCache {
            layers,
            len: 0,
            row_image: (0..rows).map(|r| r / per_image).collect(),
            layout: CrossLayout::Uniform(per_image),
        })
    }

    /// Vocabulary logits `[B, T, V]` of hidden states.
    pub fn logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        let h = &self.head;
        let x = h
            .transform_act
            .forward(&h.transform_dense.forward_t(hidden, train)?)?;
        let x = h.transform_layer_norm.forward(&x)?;
        h.decoder.forward_t(&x, train)
    }

    /// The kind the decoder computes in.
    /// The kind the decoder computes in: that of its weights, or the mixed-precision kind while training.
    pub fn kind(&self) -> Kind {
        self.compute_kind
            .unwrap_or_else(|| self.embeddings.word_embeddings.weight.kind())
    }

    /// Every Linear with its path, in transformers' `named_modules()` order.
    pub fn for_each_layer(&mut self, path: &str, f: &mut LayerVisitor) -> Result<()> {
        let bert = join(path, "bert");
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = join(&bert, &format!("encoder.layer.{i}"));
            let mut blocks = vec![("attention", &mut layer.attention)];
            if let Some(ca) = layer.crossattention.as_mut() {
                blocks.push(("crossattention", ca));
            }
            for (name, block) in blocks {
                let b = join(&p, name);
                f(
                    &join(&b, "self.query"),
                    AdaptableLayer::Linear(&mut block.self_.query),
                )?;
                f(
                    &join(&b, "self.key"),
                    AdaptableLayer::Linear(&mut block.self_.key),
                )?;
                f(
                    &join(&b, "self.value"),
                    AdaptableLayer::Linear(&mut block.self_.value),
                )?;
                f(
                    &join(&b, "output.dense"),
                    AdaptableLayer::Linear(&mut block.output.dense),
                )?;
            }
            f(
                &join(&p, "intermediate.dense"),
                AdaptableLayer::Linear(&mut layer.intermediate),
            )?;
            f(
                &join(&p, "output.dense"),
                AdaptableLayer::Linear(&mut layer.output.dense),
            )?;
        }
        let pred = join(path, "cls.predictions");
        f(
            &join(&pred, "transform.dense"),
            AdaptableLayer::Linear(&mut self.head.transform_dense),
        )?;
        f(
            &join(&pred, "decoder"),
            AdaptableLayer::Linear(&mut self.head.decoder),
        )
    }

    pub fn visit(&self, path: &str, f: &mut ParamVisitor) {
        let bert = join(path, "bert");
        self.embeddings.visit(&join(&bert, "embeddings"), f);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.visit(&join(&bert, &format!("encoder.layer.{i}")), f);
        }
        let pred = join(path, "cls.predictions");
        f(&join(&pred, "bias"), &self.head.bias);
        self.head
            .transform_dense
            .visit(&join(&pred, "transform.dense"), f);
        self.head
            .transform_layer_norm
            .visit(&join(&pred, "transform.LayerNorm"), f);
        self.head.decoder.visit(&join(&pred, "decoder"), f);
    }

    pub fn visit_mut(&mut self, path: &str, f: &mut ParamVisitorMut) {
        let bert = join(path, "bert");
        self.embeddings.visit_mut(&join(&bert, "embeddings"), f);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit_mut(&join(&bert, &format!("encoder.layer.{i}")), f);
        }
        let pred = join(path, "cls.predictions");
        f(&join(&pred, "bias"), &mut self.head.bias);
        self.head
            .transform_dense
            .visit_mut(&join(&pred, "transform.dense"), f);
        self.head
            .transform_layer_norm
            .visit_mut(&join(&pred, "transform.LayerNorm"), f);
        self.head.decoder.visit_mut(&join(&pred, "decoder"), f);
    }

    pub fn repr(&self) -> ReprNode {
        let h = &self.head;
        let decoder = h.decoder.repr();
        let layers = ReprNode::list(self.layers.iter().map(BlipTextLayer::repr).collect());
        let bert = ReprNode::module(
            "BlipTextModel",
            vec![
                ("embeddings", self.embeddings.repr()),
                (
                    "encoder",
                    ReprNode::module("BlipTextEncoder", vec![("layer", layers)]),
                ),
            ],
        );
        let transform = ReprNode::module(
            "BlipTextPredictionHeadTransform",
            vec![
                ("dense", h.transform_dense.repr()),
                (
                    "transform_act_fn",
                    ReprNode::leaf(h.transform_act.repr().trim_end_matches("()"), ""),
                ),
                ("LayerNorm", h.transform_layer_norm.repr()),
            ],
        );
        let predictions = ReprNode::module(
            "BlipTextLMPredictionHead",
            vec![("transform", transform), ("decoder", decoder)],
        );
        let cls = ReprNode::module("BlipTextOnlyMLMHead", vec![("predictions", predictions)]);
        ReprNode::module("BlipTextLMHeadModel", vec![("bert", bert), ("cls", cls)])
    }
}
