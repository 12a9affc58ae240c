//! LoRA with peft's semantics: the configuration (`adapter_config.json`), the adapter attached to a
//! Linear or Conv2d layer, and injection by module path.

pub mod config;
pub mod host;
pub mod inject;
pub mod layer;
pub mod mixed;
pub mod saved;

pub use config::{LoraConfig, TargetModules};
pub use host::LoraHost;
pub use inject::inject;
pub use layer::{LoraAdapter, LoraSlot};
