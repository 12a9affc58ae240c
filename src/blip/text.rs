//! BLIP's caption decoder: a post-norm BERT with causal self-attention, cross-attention to the image
//! embeddings and a tied LM head (`BlipTextLMHeadModel` in transformers).

use tch::{Kind, Tensor};

use crate::config::BlipTextConfig;
use crate::error::Result;
use crate::lora::inject::{AdaptableLayer, LayerVisitor};
use crate::nn::attention::{merge_heads, sdpa, split_heads};
use crate::nn::{join, Activation, Dropout, Embedding, Init, LayerNorm, Linear, ParamSource, ParamVisitor};
use crate::repr::ReprNode;

/// Keys and values one decoder layer keeps between decoding steps.
#[derive(Debug, Default)]
pub struct LayerCache {
    /// Self-attention keys/values of all positions so far, `[B, H, S, D]`.
    pub self_kv: Option<(Tensor, Tensor)>,
    /// Cross-attention keys/values of the image embeddings, computed once per image.
    pub cross_kv: Option<(Tensor, Tensor)>,
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

    fn forward(&self, input_ids: &Tensor, past: i64, train: bool) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let positions = Tensor::f_arange_start(past, past + t, (Kind::Int64, input_ids.device()))?;
        let x = self
            .word_embeddings
            .forward(input_ids)?
            .f_add(&self.position_embeddings.forward(&positions)?)?;
        self.dropout.forward(&self.layer_norm.forward(&x)?, train)
    }

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.word_embeddings.visit(&join(path, "word_embeddings"), f);
        self.position_embeddings
            .visit(&join(path, "position_embeddings"), f);
        self.layer_norm.visit(&join(path, "LayerNorm"), f);
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

    fn visit(&self, path: &str, f: &mut ParamVisitor) {
        self.query.visit(&join(path, "query"), f);
        self.key.visit(&join(path, "key"), f);
        self.value.visit(&join(path, "value"), f);
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
        cache: Option<&mut LayerCache>,
        train: bool,
    ) -> Result<Tensor> {
        let attn = &self.attention.self_;
        let (self_kv, cross_kv) = match cache {
            Some(cache) => {
                let (k, v) = attn.key_value(x, train)?;
                let kv = match cache.self_kv.take() {
                    Some((pk, pv)) => (Tensor::f_cat(&[pk, k], 2)?, Tensor::f_cat(&[pv, v], 2)?),
                    None => (k, v),
                };
                cache.self_kv = Some((kv.0.shallow_clone(), kv.1.shallow_clone()));
                let cross = match (&self.crossattention, &cache.cross_kv) {
                    (Some(_), Some((k, v))) => Some((k.shallow_clone(), v.shallow_clone())),
                    (Some(ca), None) => {
                        let kv = ca.self_.key_value(image, train)?;
                        cache.cross_kv = Some((kv.0.shallow_clone(), kv.1.shallow_clone()));
                        Some(kv)
                    }
                    (None, _) => None,
                };
                (kv, cross)
            }
            None => {
                let cross = match &self.crossattention {
                    Some(ca) => Some(ca.self_.key_value(image, train)?),
                    None => None,
                };
                (attn.key_value(x, train)?, cross)
            }
        };
        let h = attn.attend(x, &self_kv, masks.self_mask, masks.causal, train)?;
        let mut x = self.attention.output.forward(&h, x, train)?;
        if let (Some(ca), Some(kv)) = (&self.crossattention, cross_kv) {
            let h = ca.self_.attend(&x, &kv, None, false, train)?;
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
        })
    }

    /// Decoder hidden states `[B, T, D]` for `input_ids` `[B, T]` attending to `image` `[B, N, Dv]`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        image: &Tensor,
        masks: &DecoderMasks,
        mut cache: Option<&mut [LayerCache]>,
        train: bool,
    ) -> Result<Tensor> {
        let past = match &cache {
            Some(c) => c
                .first()
                .and_then(|l| l.self_kv.as_ref())
                .map_or(0, |(k, _)| k.size()[2]),
            None => 0,
        };
        let mut x = self.embeddings.forward(input_ids, past, train)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().and_then(|c| c.get_mut(i));
            x = layer.forward(&x, image, masks, layer_cache, train)?;
        }
        Ok(x)
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
    pub fn kind(&self) -> Kind {
        self.embeddings.word_embeddings.weight.kind()
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
