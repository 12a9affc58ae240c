//! The BLIP image-captioning model (`BlipForConditionalGeneration`): an image encoder and a caption decoder.

pub mod kv_cache;
mod model;
pub mod recompute;
pub mod text;
pub mod vision;

pub(crate) use model::text_context;
pub use model::{kind_name, BlipForConditionalGeneration, BlipOutput, ForwardInputs, ForwardOptions};
pub use vision::{Record, Recorded};
