//! The BLIP models: image captioning (`BlipForConditionalGeneration`: an image encoder and a caption decoder)
//! visual question answering (`BlipForQuestionAnswering`: with a question encoder between them) and image-text
//! retrieval (`retrieval.rs`: the image encoder, a text encoder and the matching heads).

pub(crate) mod head;
pub mod kv_cache;
mod model;
pub mod recompute;
pub mod retrieval;
pub mod text;
pub mod vision;
mod vqa;

pub(crate) use model::text_context;
pub use model::{kind_name, BlipForConditionalGeneration, BlipOutput, ForwardInputs, ForwardOptions};
pub use vision::{Record, Recorded};
pub use vqa::{BlipForQuestionAnswering, VqaInputs, VqaOutput};
