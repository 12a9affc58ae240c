//! What a forward pass runs under. The loop that drives the model chooses it (a plain call, the trainer,
//! `generate`) and hands it down explicitly to every layer; the model itself keeps none of it, so no loop
//! leaves state behind on the model for the next caller to trip over.

use tch::Kind;

use super::adapter::AdapterRows;

/// How one forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForwardContext<'a> {
    /// Dropout is active (the layers' and the adapters').
    pub train: bool,
    /// With `train`: each transformer layer draws its dropout under a seed derived from this one
    /// (`blip::recompute::layer_seed`), so gradient checkpointing's recomputation and a plain step agree.
    pub dropout_seed: Option<i64>,
    /// The kind activations are computed in when it differs from the weights' (mixed-precision training:
    /// float32 trained weights over a half-precision frozen base).
    pub compute_kind: Option<Kind>,
    /// Dense layers over a few rows, without a graph, may take the decoding kernel (`few_rows.rs`). Only
    /// `generate` asks for it: its sums round differently from MKL's, and a checkpointed training step, for
    /// one, must get exactly the numbers its recomputation with torch gets.
    pub decoding_kernel: bool,
    /// The caption loss's label smoothing when the caller overrides the checkpoint's
    /// (`text_config.label_smoothing`): `train(label_smoothing=...)` does, for its run only.
    pub label_smoothing: Option<f64>,
    /// A mixed-adapter batch (peft's `adapter_names`): the adapter each row of the layers' inputs uses (their
    /// first dimension). None: every row runs the active adapters.
    pub adapters: Option<&'a AdapterRows>,
    /// The adapters of the image embeddings' rows, for the layers that read them (the decoder's
    /// cross-attention keys/values): one per image, where `adapters` has one per decoder row.
    pub image_adapters: Option<&'a AdapterRows>,
    /// Images may have another resolution than the checkpoint's `image_size`: the vision tower resamples its
    /// patch position embeddings to the image's grid (transformers' `interpolate_pos_encoding=True`).
    pub interpolate_pos_encoding: bool,
}

impl<'a> ForwardContext<'a> {
    /// Inference as torch runs it: no dropout, the weights' kind, torch's kernels.
    pub const INFERENCE: Self = Self {
        train: false,
        dropout_seed: None,
        compute_kind: None,
        decoding_kernel: false,
        label_smoothing: None,
        adapters: None,
        image_adapters: None,
        interpolate_pos_encoding: false,
    };

    /// Inference while generating: the decoding kernel allowed.
    pub const DECODING: Self = Self {
        decoding_kernel: true,
        ..Self::INFERENCE
    };

    /// A plain forward in training (`true`: dropout on) or evaluation mode, as `model.train()` / `eval()` set.
    pub fn mode(train: bool) -> Self {
        Self {
            train,
            ..Self::INFERENCE
        }
    }

    /// A training step's forward: dropout drawn under `dropout_seed`, activations in `compute_kind`.
    pub fn training(dropout_seed: i64, compute_kind: Option<Kind>) -> Self {
        Self {
            train: true,
            dropout_seed: Some(dropout_seed),
            compute_kind,
            ..Self::INFERENCE
        }
    }

    /// The same context over a mixed-adapter batch: `rows` for the layers' inputs, `images` for the image
    /// embeddings' rows (the same selection when every image has one row).
    pub fn with_adapters<'b>(
        self,
        rows: Option<&'b AdapterRows>,
        images: Option<&'b AdapterRows>,
    ) -> ForwardContext<'b>
    where
        'a: 'b,
    {
        ForwardContext {
            adapters: rows,
            image_adapters: images,
            ..self
        }
    }

    /// The context for a layer whose input rows are the image embeddings' (cross-attention keys/values).
    pub fn over_images(self) -> Self {
        Self {
            adapters: self.image_adapters,
            ..self
        }
    }

    /// The same context, with images at another resolution than the checkpoint's allowed (`interpolate`).
    pub fn with_interpolate_pos_encoding(self, interpolate: bool) -> Self {
        Self {
            interpolate_pos_encoding: interpolate,
            ..self
        }
    }

    /// The kind a module whose weights are in `weights` computes in.
    pub fn kind(&self, weights: Kind) -> Kind {
        self.compute_kind.unwrap_or(weights)
    }

    /// The seed the layers derive their dropout seeds from: only when dropout is on.
    pub fn layer_seed_base(&self) -> Option<i64> {
        self.dropout_seed.filter(|_| self.train)
    }

    /// The same context with the dropout seed moved by `offset` (each tower draws from its own stream).
    pub fn with_seed_offset(self, offset: i64) -> Self {
        Self {
            dropout_seed: self.dropout_seed.map(|s| s.wrapping_add(offset)),
            ..self
        }
    }
}

impl Default for ForwardContext<'_> {
    fn default() -> Self {
        Self::INFERENCE
    }
}
