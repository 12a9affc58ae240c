//! Building blocks shared by both towers: parameters, their sources (a checkpoint or a random
//! initialiser), and the layers (Linear is the one place LoRA attaches to).

mod activation;
pub mod adapter;
pub mod attention;
mod context;
pub mod dropout_mask;
pub mod few_rows;
mod layers;
pub mod module;
mod params;
pub mod saved;

pub use activation::Activation;
pub use adapter::{Adapter, AdapterRows, BASE_ADAPTER};
pub use context::ForwardContext;
pub use layers::{in_kind, Conv2d, Dropout, Embedding, LayerNorm, Linear};
pub use module::{visit_adaptable, visit_params, visit_params_mut, AdaptableLayer, LayerVisitor, Module};
pub use params::{join, Init, ParamSource, ParamVisitor, ParamVisitorMut, RandomInit};

/// Kinds of float tensors the model can hold its weights in.
pub fn is_float_kind(kind: tch::Kind) -> bool {
    matches!(
        kind,
        tch::Kind::Float | tch::Kind::Half | tch::Kind::BFloat16 | tch::Kind::Double
    )
}

/// Whether autograd records operations on this thread (torch's grad mode; off inside `no_grad`).
pub fn grad_enabled() -> bool {
    // SAFETY: at_grad_set_enabled swaps the thread's grad mode and returns the old one; we put it back.
    unsafe {
        let was = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(was);
        was != 0
    }
}
