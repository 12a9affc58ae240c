//! BLIP's text towers: the caption decoder, a post-norm BERT with causal self-attention, cross-attention to
//! the image embeddings and a tied LM head (`BlipTextLMHeadModel` in transformers), and the same BERT body
//! run as a bidirectional encoder (`BlipTextModel` with `is_decoder=False`: VQA's question encoder,
//! retrieval's text encoder), whose cross-attention is optional.

use tch::{Kind, Tensor};

use super::kv_cache::{CrossLayout, DecoderCache, ImageKeysValues, LayerCache};
use super::recompute::{layer_seed, Checkpointed};
use crate::config::BlipTextConfig;
use crate::error::Error;
use crate::error::Result;
use crate::module;
use crate::nn::attention::{merge_heads, padding_mask, sdpa, split_heads};
use crate::nn::{
    in_kind, join, Activation, Dropout, Embedding, ForwardContext, Init, LayerNorm, Linear, ParamSource,
};

/// Word and position embeddings, layer-normalised (no token types in BLIP).
#[derive(Debug)]
pub struct BlipTextEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

module!(BlipTextEmbeddings: "BlipTextEmbeddings" {
    children: [
        "word_embeddings" => word_embeddings,
        "position_embeddings" => position_embeddings,
        "LayerNorm" => layer_norm,
        "dropout" => dropout,
    ],
});

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
    fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        kind: Kind,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        self.forward_input(TextInput::Ids(input_ids), positions, kind, cx)
    }

    /// [`Self::forward`] of token ids or of word embeddings given in their place (`inputs_embeds`).
    fn forward_input(
        &self,
        input: TextInput,
        positions: &Tensor,
        kind: Kind,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let words = match input {
            TextInput::Ids(ids) => self.word_embeddings.forward(ids)?,
            TextInput::Embeds(embeds) => embeds.shallow_clone(),
        };
        let x =
            in_kind(&words, kind)?.f_add(&in_kind(&self.position_embeddings.forward(positions)?, kind)?)?;
        self.dropout.forward(&self.layer_norm.forward(&x)?, cx.train)
    }
}

/// The text a text tower reads: token ids `[B, T]`, or word embeddings `[B, T, D]` in their place
/// (transformers' `inputs_embeds`: position embeddings, LayerNorm and dropout are still applied).
#[derive(Clone, Copy)]
pub enum TextInput<'a> {
    Ids(&'a Tensor),
    Embeds(&'a Tensor),
}

impl TextInput<'_> {
    /// `(batch, tokens)`.
    fn batch_and_len(&self) -> Result<(i64, i64)> {
        let size = match self {
            TextInput::Ids(t) | TextInput::Embeds(t) => t.size(),
        };
        match (self, size.as_slice()) {
            (TextInput::Ids(_), [b, t]) | (TextInput::Embeds(_), [b, t, _]) => Ok((*b, *t)),
            (TextInput::Ids(_), _) => Err(Error::invalid(format!(
                "input_ids must have shape [batch, sequence], got {size:?}"
            ))),
            (TextInput::Embeds(_), _) => Err(Error::invalid(format!(
                "inputs_embeds must have shape [batch, sequence, hidden_size], got {size:?}"
            ))),
        }
    }

    fn device(&self) -> tch::Device {
        match self {
            TextInput::Ids(t) | TextInput::Embeds(t) => t.device(),
        }
    }
}

/// What a text layer's cross-attention attends to: encoder states `[B, S, C]` (the image embeddings, or
/// the question encoding VQA's answer decoder reads) and their additive padding mask (`[B, 1, 1, S]`,
/// 0 / `finfo.min`, as [`padding_mask`] builds it), None when every position is attended.
#[derive(Clone, Copy)]
pub struct CrossStates<'a> {
    pub states: &'a Tensor,
    pub mask: Option<&'a Tensor>,
    /// When given, `states` holds one row per image (`[images, S, C]`, every position attended) and the
    /// text rows, sorted by image, share them as the layout says: each layer computes an image's keys and
    /// values once for all its rows (ITM re-ranking's candidate texts). Inference only (no attention dropout).
    pub shared: Option<&'a CrossLayout>,
    /// This layer's cross-attention `key` and `value` base projections of `states`, computed earlier
    /// ([`CrossProjections`]), with whether they may be written; None: computed here. Read by the plain path
    /// only (training and scoring).
    pub projected: Option<(&'a (Tensor, Tensor), bool)>,
}

/// Every decoder layer's cross-attention `key` and `value` base projections of a batch's image embeddings
/// (`x Wᵀ + b`, as rows `[B·N, C]`; their adapters, if any, still add their part in the forward): the frozen
/// part of the keys and values, which the training feature cache keeps per image so later epochs skip those
/// GEMMs over the image positions, the larger part of a text-only step.
#[derive(Debug)]
pub struct CrossProjections {
    pub layers: Vec<(Tensor, Tensor)>,
    /// Whether the forward may add the adapters' parts into these tensors in place: they are fresh, held
    /// nowhere else and read by that one forward (a training step's, stacked from the cache's rows). Spares a
    /// copy of every layer's keys and values a step.
    pub writable: bool,
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

module!(BlipTextSelfAttention: "BlipTextSelfAttention" {
    children: ["query" => query, "key" => key, "value" => value, "dropout" => dropout],
});

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
    pub fn key_value(&self, states: &Tensor, cx: &ForwardContext) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.key.forward_t(states, cx)?, self.num_heads)?,
            split_heads(&self.value.forward_t(states, cx)?, self.num_heads)?,
        ))
    }

    /// [`Self::key_value`] over `projected`, the base projections of `states` as rows (their adapters add
    /// to them, in place when [`CrossProjections::writable`]), else computed here.
    fn key_value_over(
        &self,
        states: &Tensor,
        projected: Option<(&(Tensor, Tensor), bool)>,
        cx: &ForwardContext,
    ) -> Result<(Tensor, Tensor)> {
        let Some(((keys, values), writable)) = projected else {
            return self.key_value(states, cx);
        };
        if cx.adapters.is_some() {
            // A mixed-adapter batch picks adapters by batch row; projections are read by training only.
            return Err(Error::invalid(
                "cross-attention projections cannot be read in a mixed-adapter batch",
            ));
        }
        let (b, n, width) = states.size3()?;
        let rows = states.f_reshape([b * n, width])?; // the projections' rows
        let over = |layer: &Linear, base: &Tensor| -> Result<Tensor> {
            let out = layer.forward_over_base(&rows, base.shallow_clone(), writable, cx)?;
            split_heads(&out.f_reshape([b, n, -1])?, self.num_heads)
        };
        Ok((over(&self.key, keys)?, over(&self.value, values)?))
    }

    /// Attention of `hidden` over `kv`, with an additive `mask` or a plain causal one.
    fn attend(
        &self,
        hidden: &Tensor,
        kv: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let q = split_heads(&self.query.forward_t(hidden, cx)?, self.num_heads)?;
        let p = if cx.train { self.dropout.p } else { 0.0 };
        merge_heads(&sdpa(&q, &kv.0, &kv.1, mask, p, causal)?)
    }

    /// Cross-attention of `hidden`'s rows over their images' keys/values, shared as `layout` says.
    fn attend_shared(
        &self,
        hidden: &Tensor,
        kv: &ImageKeysValues,
        layout: &CrossLayout,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let q = split_heads(&self.query.forward_t(hidden, cx)?, self.num_heads)?; // [R, H, T, D]
        merge_heads(&kv.attend_rows(&q, layout)?)
    }

    /// This cross-attention block's keys/values over the image embeddings `image`, `[images, N, C]`, in the
    /// layout decoding reads fastest (see [`ImageKeysValues`]).
    fn image_keys_values(&self, image: &Tensor, cx: &ForwardContext) -> Result<ImageKeysValues> {
        if ImageKeysValues::features_first_for(image) {
            let (images, n, _) = image.size3()?;
            let h = self.num_heads;
            let heads = |t: Tensor| -> Result<Tensor> {
                let d = t.size()[1] / h;
                Ok(t.f_view([images, h, d, n])?)
            };
            return Ok(ImageKeysValues::FeaturesFirst {
                keys: heads(self.key.forward_features_first(image, cx)?)?,
                values: heads(self.value.forward_features_first(image, cx)?)?,
            });
        }
        let (keys, values) = self.key_value(image, cx)?;
        Ok(ImageKeysValues::Heads {
            keys: keys.f_contiguous()?,
            values: values.f_contiguous()?,
        })
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

module!(BlipTextResidualOutput: self.type_name {
    children: ["dense" => dense, "LayerNorm" => layer_norm, "dropout" => dropout],
});

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

    fn forward(&self, h: &Tensor, residual: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let h = self.dropout.forward(&self.dense.forward_t(h, cx)?, cx.train)?;
        self.layer_norm.forward(&h.f_add(residual)?)
    }
}

/// An attention block with its output projection (`attention` or `crossattention`).
#[derive(Debug)]
pub struct BlipTextAttention {
    pub self_: BlipTextSelfAttention,
    pub output: BlipTextResidualOutput,
}

module!(BlipTextAttention: "BlipTextAttention" {
    children: ["self" => self_, "output" => output],
});

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
}

/// One decoder block: causal self-attention, cross-attention to the image, feed-forward.
#[derive(Debug)]
pub struct BlipTextLayer {
    pub attention: BlipTextAttention,
    pub crossattention: Option<BlipTextAttention>,
    pub intermediate: BlipTextIntermediate,
    pub output: BlipTextResidualOutput,
}

/// The feed-forward block's first half: `act(dense(h))`.
#[derive(Debug)]
pub struct BlipTextIntermediate {
    pub dense: Linear,
    pub intermediate_act_fn: Activation,
}

module!(BlipTextIntermediate: "BlipTextIntermediate" {
    children: ["dense" => dense, "intermediate_act_fn" => intermediate_act_fn],
});

module!(BlipTextLayer: "BlipTextLayer" {
    children: [
        "attention" => attention,
        "crossattention" => ?crossattention,
        "intermediate" => intermediate,
        "output" => output,
    ],
});

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
            intermediate: BlipTextIntermediate {
                dense: Linear::load(
                    src,
                    &join(path, "intermediate.dense"),
                    c.hidden_size,
                    c.intermediate_size,
                    c.initializer_range,
                )?,
                intermediate_act_fn: Activation::from_name(&c.hidden_act)?,
            },
            output: BlipTextResidualOutput::load(
                src,
                &join(path, "output"),
                c,
                c.intermediate_size,
                "BlipTextOutput",
            )?,
        })
    }

    /// One layer over `x`. Its cross-attention runs when `cross` is given and is skipped otherwise (as
    /// transformers skips it without `encoder_hidden_states`).
    fn forward(
        &self,
        x: &Tensor,
        cross: Option<CrossStates>,
        masks: &DecoderMasks,
        cache: Option<(&mut LayerCache, i64, &CrossLayout)>,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let attn = &self.attention.self_;
        let mut cache = cache;
        let self_kv = match &mut cache {
            Some((cache, pos, _)) => {
                // Write this step's keys/values into the preallocated buffers, attend over all filled positions.
                let (k, v) = attn.key_value(x, cx)?;
                let t = k.size()[2];
                cache.k.f_narrow(2, *pos, t)?.f_copy_(&k)?;
                cache.v.f_narrow(2, *pos, t)?.f_copy_(&v)?;
                (
                    cache.k.f_narrow(2, 0, *pos + t)?,
                    cache.v.f_narrow(2, 0, *pos + t)?,
                )
            }
            None => attn.key_value(x, cx)?,
        };
        let h = attn.attend(x, &self_kv, masks.self_mask, masks.causal, cx)?;
        let mut x = self.attention.output.forward(&h, x, cx)?;
        if let Some(cross) = cross {
            let Some(ca) = &self.crossattention else {
                return Err(Error::invalid(
                    "this text tower has no cross-attention layers (text_config.is_decoder is false); \
                     encode without encoder_hidden_states",
                ));
            };
            let h = match cache {
                Some((cache, _, layout)) => {
                    if cross.mask.is_some() {
                        return Err(Error::invalid(
                            "a cached decoding step attends to every encoder position; it takes no \
                             encoder_attention_mask",
                        ));
                    }
                    let kv = match cache.cross_kv.take() {
                        Some(kv) => kv,
                        None => ca.self_.image_keys_values(cross.states, &cx.over_images())?,
                    };
                    let h = ca.self_.attend_shared(&x, &kv, layout, cx)?;
                    cache.cross_kv = Some(kv);
                    h
                }
                None => match cross.shared {
                    Some(layout) => {
                        let kv = ca.self_.image_keys_values(cross.states, &cx.over_images())?;
                        ca.self_.attend_shared(&x, &kv, layout, cx)?
                    }
                    None => {
                        let kv = ca
                            .self_
                            .key_value_over(cross.states, cross.projected, &cx.over_images())?;
                        ca.self_.attend(&x, &kv, cross.mask, false, cx)?
                    }
                },
            };
            x = ca.output.forward(&h, &x, cx)?;
        }
        let h = self
            .intermediate
            .intermediate_act_fn
            .forward(&self.intermediate.dense.forward_t(&x, cx)?)?;
        self.output.forward(&h, &x, cx)
    }
}

/// The decoder's BERT body (`text_decoder.bert`): embeddings and the stack of layers.
#[derive(Debug)]
pub struct BlipTextModel {
    pub embeddings: BlipTextEmbeddings,
    pub encoder: BlipTextEncoder,
}

module!(BlipTextModel: "BlipTextModel" {
    children: ["embeddings" => embeddings, "encoder" => encoder],
});

impl BlipTextModel {
    /// The BERT body under `path` (`text_decoder.bert`, `text_encoder`): embeddings and
    /// `text_config.num_hidden_layers` layers, with cross-attention when `text_config.is_decoder` (as in
    /// transformers, whose VQA and retrieval text encoders keep it: their configs are decoders' configs).
    /// Without a pooler (`add_pooling_layer=False`, as every BLIP head builds it).
    pub fn load(src: &mut dyn ParamSource, path: &str, c: &BlipTextConfig) -> Result<Self> {
        let embeddings = BlipTextEmbeddings::load(src, &join(path, "embeddings"), c)?;
        let layer = (0..c.num_hidden_layers)
            .map(|i| BlipTextLayer::load(src, &join(path, &format!("encoder.layer.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        src.ignore(&join(path, "embeddings.position_ids"));
        Ok(Self {
            embeddings,
            encoder: BlipTextEncoder { layer },
        })
    }

    /// The kind of the tower's weights.
    pub fn kind(&self) -> Kind {
        self.embeddings.word_embeddings.weight.kind()
    }

    /// The kind the tower computes in under `cx`: its weights', or the mixed-precision kind while training.
    pub fn compute_kind(&self, cx: &ForwardContext) -> Kind {
        cx.kind(self.kind())
    }

    /// transformers' `BlipTextModel(...)(is_decoder=False)`: the last hidden state `[B, T, D]` of `input`
    /// with bidirectional self-attention over the positions `attention_mask` (`[B, T]`, 1 = attend, None:
    /// all) keeps, positions 0..T. With `encoder` (`(states [B, S, C], mask [B, S] or None)`) every layer
    /// cross-attends to those states (the image embeddings for ITM / VQA's question encoding); without,
    /// the cross-attention is skipped (retrieval's ITC text features). Training with a dropout seed, layer
    /// `i` runs under `layer_seed(seed, i)`.
    pub fn encode(
        &self,
        input: TextInput,
        attention_mask: Option<&Tensor>,
        encoder: Option<(&Tensor, Option<&Tensor>)>,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let kind = self.compute_kind(cx);
        let self_mask = self_attention_mask(&input, attention_mask, kind)?;
        let cross_mask = match encoder {
            Some((states, Some(m))) => {
                let (sb, s, _) = states.size3()?;
                if m.size() != [sb, s] {
                    return Err(Error::invalid(format!(
                        "encoder_attention_mask has shape {:?} but encoder_hidden_states has {:?}; it must \
                         be [batch, encoder positions]",
                        m.size(),
                        states.size()
                    )));
                }
                Some(padding_mask(m, kind)?)
            }
            _ => None,
        };
        let cross = encoder.map(|(states, _)| CrossStates {
            states,
            mask: cross_mask.as_ref(),
            shared: None,
            projected: None,
        });
        self.encode_over(input, self_mask.as_ref(), cross, cx)
    }

    /// [`Self::encode`] with each image's cross-attention keys/values computed once for the text rows that
    /// share it: `images` `[images, N, C]` (every position attended), the rows sorted by image as `layout`
    /// says. Inference only: training or per-row adapters need [`Self::encode`] over one image per row.
    pub fn encode_over_shared_images(
        &self,
        input: TextInput,
        attention_mask: Option<&Tensor>,
        images: &Tensor,
        layout: &CrossLayout,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        if cx.train || cx.adapters.is_some() {
            return Err(Error::invalid(
                "shared image keys/values serve inference without per-row adapters; encode one image per row",
            ));
        }
        let self_mask = self_attention_mask(&input, attention_mask, self.compute_kind(cx))?;
        let cross = CrossStates {
            states: images,
            mask: None,
            shared: Some(layout),
            projected: None,
        };
        self.encode_over(input, self_mask.as_ref(), Some(cross), cx)
    }

    /// The layers over `input` with an additive self-attention mask and what the cross-attention reads.
    fn encode_over(
        &self,
        input: TextInput,
        self_mask: Option<&Tensor>,
        cross: Option<CrossStates>,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let t = input.batch_and_len()?.1;
        let kind = self.compute_kind(cx);
        let masks = DecoderMasks {
            self_mask,
            causal: false,
        };
        let positions = Tensor::f_arange(t, (Kind::Int64, input.device()))?;
        let mut x = self.embeddings.forward_input(input, &positions, kind, cx)?;
        let seed = cx.layer_seed_base();
        for (i, layer) in self.encoder.layer.iter().enumerate() {
            if let Some(seed) = seed {
                tch::manual_seed(layer_seed(seed, i));
            }
            x = layer.forward(&x, cross, &masks, None, cx)?;
        }
        Ok(x)
    }
}

/// The stack of decoder layers.
#[derive(Debug)]
pub struct BlipTextEncoder {
    pub layer: Vec<BlipTextLayer>,
}

module!(BlipTextEncoder: "BlipTextEncoder" { children: ["layer" => layer] });

/// `LayerNorm(act(dense(h)))`, before the vocabulary projection.
#[derive(Debug)]
pub struct BlipTextPredictionHeadTransform {
    pub dense: Linear,
    pub transform_act_fn: Activation,
    pub layer_norm: LayerNorm,
}

module!(BlipTextPredictionHeadTransform: "BlipTextPredictionHeadTransform" {
    children: ["dense" => dense, "transform_act_fn" => transform_act_fn, "LayerNorm" => layer_norm],
});

/// The LM head: `decoder(transform(h))`, whose decoder weight is usually the word embeddings.
#[derive(Debug)]
pub struct BlipTextLmPredictionHead {
    pub transform: BlipTextPredictionHeadTransform,
    /// `decoder`: over the word embeddings and `bias` when tied, its own weights otherwise.
    pub decoder: Linear,
    /// The decoder's bias when tied (and an unused parameter when untied, as in transformers).
    pub bias: Tensor,
}

module!(BlipTextLmPredictionHead: "BlipTextLMPredictionHead" {
    params: ["bias" => bias],
    children: ["transform" => transform, "decoder" => decoder],
});

/// `cls`: the prediction head's container.
#[derive(Debug)]
pub struct BlipTextOnlyMlmHead {
    pub predictions: BlipTextLmPredictionHead,
}

module!(BlipTextOnlyMlmHead: "BlipTextOnlyMLMHead" { children: ["predictions" => predictions] });

/// The caption decoder with its LM head (`text_decoder`).
#[derive(Debug)]
pub struct BlipTextLmHeadModel {
    pub bert: BlipTextModel,
    pub cls: BlipTextOnlyMlmHead,
    pub config: BlipTextConfig,
}

module!(BlipTextLmHeadModel: "BlipTextLMHeadModel" { children: ["bert" => bert, "cls" => cls] });

impl BlipTextLmHeadModel {
    pub fn load(src: &mut dyn ParamSource, path: &str, c: &BlipTextConfig, tied: bool) -> Result<Self> {
        let bert = BlipTextModel::load(src, &join(path, "bert"), c)?;
        let embeddings = &bert.embeddings;
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
        // transformers ties only what the checkpoint allows: a stored decoder weight that differs from the word
        // embeddings (the config says tied, the weights say otherwise) stays the decoder's own.
        let differs = match tied
            .then(|| src.stored(&join(&pred, "decoder.weight")))
            .transpose()?
        {
            Some(Some(stored)) => {
                let embeddings = embeddings.word_embeddings.weight.f_to_device(tch::Device::Cpu)?;
                stored.size() != embeddings.size() || !stored.f_to_kind(embeddings.kind())?.equal(&embeddings)
            }
            _ => false,
        };
        let decoder = if tied && !differs {
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
        let transform = BlipTextPredictionHeadTransform {
            dense: transform_dense,
            transform_act_fn: Activation::from_name(&c.hidden_act)?,
            layer_norm: transform_layer_norm,
        };
        Ok(Self {
            bert,
            cls: BlipTextOnlyMlmHead {
                predictions: BlipTextLmPredictionHead {
                    transform,
                    decoder,
                    bias,
                },
            },
            config: c.clone(),
        })
    }

    /// Decoder hidden states `[B, T, D]` for `input_ids` `[B, T]` attending to `image` `[B, N, Dv]`
    /// (training and scoring: positions 0..T, no cache). Training with a dropout seed, layer `i` runs under
    /// `layer_seed(seed, i)` (the same dropout draws as `hidden_states_checkpointed`).
    /// With `projected` (from [`Self::cross_projections`] of the same `image`), the cross-attention reads the
    /// keys' and values' base projections from there instead of computing them.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        image: &Tensor,
        projected: Option<&CrossProjections>,
        masks: &DecoderMasks,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let layers = self.bert.encoder.layer.len();
        if let Some(p) = projected.filter(|p| p.layers.len() != layers) {
            return Err(Error::invalid(format!(
                "cross-attention projections of {} layers given to a decoder of {layers}",
                p.layers.len()
            )));
        }
        self.layers_over(input_ids, masks, cx, |i| CrossStates {
            projected: projected.map(|p| (&p.layers[i], p.writable)),
            ..image_states(image)
        })
    }

    /// Each layer's cross-attention `key` and `value` base projections of `image` (`[B, N, Dv]`), without a
    /// graph, as [`Self::hidden_states`] computes them; None when one of those layers' base weights trains
    /// (then they change every step) or the decoder has no cross-attention.
    pub fn cross_projections(&self, image: &Tensor, cx: &ForwardContext) -> Result<Option<CrossProjections>> {
        let cx = cx.over_images();
        let mut layers = Vec::with_capacity(self.bert.encoder.layer.len());
        for layer in &self.bert.encoder.layer {
            let Some(ca) = &layer.crossattention else {
                return Ok(None);
            };
            let (key, value) = (&ca.self_.key, &ca.self_.value);
            if key.base_trains() || value.base_trains() {
                return Ok(None);
            }
            let _guard = tch::no_grad_guard();
            let rows = |p: Tensor| p.f_flatten(0, 1);
            layers.push((
                rows(key.base_forward(image, &cx)?)?,
                rows(value.base_forward(image, &cx)?)?,
            ));
        }
        Ok(Some(CrossProjections {
            layers,
            writable: false,
        }))
    }

    /// [`Self::hidden_states`] cross-attending to any encoder states (VQA's answer decoder reads the
    /// question encoding).
    pub fn hidden_states_over(
        &self,
        input_ids: &Tensor,
        cross: CrossStates,
        masks: &DecoderMasks,
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        self.layers_over(input_ids, masks, cx, |_| cross)
    }

    /// The embeddings of `input_ids` through every layer, layer `i` cross-attending to `cross(i)`.
    fn layers_over<'c>(
        &self,
        input_ids: &Tensor,
        masks: &DecoderMasks,
        cx: &ForwardContext,
        cross: impl Fn(usize) -> CrossStates<'c>,
    ) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let positions = Tensor::f_arange(t, (Kind::Int64, input_ids.device()))?;
        let mut x = self
            .bert
            .embeddings
            .forward(input_ids, &positions, self.compute_kind(cx), cx)?;
        let seed = cx.layer_seed_base();
        for (i, layer) in self.bert.encoder.layer.iter().enumerate() {
            if let Some(seed) = seed {
                tch::manual_seed(layer_seed(seed, i));
            }
            x = layer.forward(&x, Some(cross(i)), masks, None, cx)?;
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
        cx: &'a ForwardContext,
    ) -> Result<(Tensor, Checkpointed<'a>)> {
        let t = input_ids.size()[1];
        let positions = Tensor::f_arange(t, (Kind::Int64, input_ids.device()))?;
        let first = self
            .bert
            .embeddings
            .forward(input_ids, &positions, self.compute_kind(cx), cx)?;
        let layer = Box::new(move |i: usize, x: &Tensor| {
            self.bert.encoder.layer[i].forward(x, Some(image_states(image)), masks, None, cx)
        });
        let tower = Checkpointed::run(first, self.bert.encoder.layer.len(), cx.dropout_seed, layer)?;
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
        cx: &ForwardContext,
    ) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let mut x = self
            .bert
            .embeddings
            .forward(input_ids, positions, self.compute_kind(cx), cx)?;
        let pos = cache.len;
        let (layer_caches, layout) = cache.layers_and_layout();
        for (layer, layer_cache) in self.bert.encoder.layer.iter().zip(layer_caches) {
            x = layer.forward(
                &x,
                Some(image_states(image)),
                masks,
                Some((layer_cache, pos, layout)),
                cx,
            )?;
        }
        cache.len += t;
        Ok(x)
    }

    /// An empty cache for `rows` rows (`per_image` per image) and up to `max_len` positions.
    pub fn new_cache(&self, rows: i64, per_image: i64, max_len: i64) -> Result<DecoderCache> {
        let c = &self.config;
        let heads = c.num_attention_heads;
        let shape = [rows, heads, max_len, c.hidden_size / heads];
        let opts = (self.kind(), self.bert.embeddings.word_embeddings.weight.device());
        DecoderCache::new(self.bert.encoder.layer.len(), shape, per_image, opts)
    }

    /// Vocabulary logits `[B, T, V]` of hidden states.
    pub fn logits(&self, hidden: &Tensor, cx: &ForwardContext) -> Result<Tensor> {
        let head = &self.cls.predictions;
        let t = &head.transform;
        let x = t.transform_act_fn.forward(&t.dense.forward_t(hidden, cx)?)?;
        head.decoder.forward_t(&t.layer_norm.forward(&x)?, cx)
    }

    /// The kind of the decoder's weights.
    pub fn kind(&self) -> Kind {
        self.bert.embeddings.word_embeddings.weight.kind()
    }

    /// The kind the decoder computes in under `cx`: its weights', or the mixed-precision kind while training.
    pub fn compute_kind(&self, cx: &ForwardContext) -> Kind {
        cx.kind(self.kind())
    }
}

/// The additive self-attention mask of `attention_mask` (`[B, T]` of `input`, 1 = attend), checked.
fn self_attention_mask(
    input: &TextInput,
    attention_mask: Option<&Tensor>,
    kind: Kind,
) -> Result<Option<Tensor>> {
    let Some(m) = attention_mask else {
        return Ok(None);
    };
    let (b, t) = input.batch_and_len()?;
    if m.size() != [b, t] {
        return Err(Error::invalid(format!(
            "attention_mask has shape {:?} but the text has {:?}; they must match",
            m.size(),
            [b, t]
        )));
    }
    Ok(Some(padding_mask(m, kind)?))
}

/// The image embeddings as cross-attention states: every patch attended (BLIP's `image_attention_mask` is
/// all ones).
fn image_states(image: &Tensor) -> CrossStates<'_> {
    CrossStates {
        states: image,
        mask: None,
        shared: None,
        projected: None,
    }
}
