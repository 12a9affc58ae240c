//! Building blocks shared by both towers: parameters, their sources (a checkpoint or a random
//! initialiser), and the layers (Linear is the one place LoRA attaches to).

mod activation;
pub mod attention;
pub mod few_rows;
mod layers;
mod params;

pub use activation::Activation;
pub use layers::{in_kind, Conv2d, Dropout, Embedding, LayerNorm, Linear};
pub use params::{join, Init, ParamSource, ParamVisitor, ParamVisitorMut, RandomInit};

/// Kinds of float tensors the model can hold its weights in.
pub fn is_float_kind(kind: tch::Kind) -> bool {
    matches!(
        kind,
        tch::Kind::Float | tch::Kind::Half | tch::Kind::BFloat16 | tch::Kind::Double
    )
}
