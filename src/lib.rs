//! blip_peft: BLIP image captioning with LoRA fine-tuning on libtorch.
//!
//! The core (everything but `python`) is plain Rust on `tch` and is tested without Python; the
//! `python` module is the only code that touches pyo3. See `docs/ARCHITECTURE.md` for the rooms and
//! the way data flows through them.

pub mod blip;
pub mod config;
pub mod cpu;
pub mod data;
pub mod device;
pub mod error;
pub mod freed_memory;
pub mod fuzzing;
pub mod generate;
pub mod lora;
pub mod metrics;
pub mod nn;
pub mod openmp;
pub mod processor;
pub mod repr;
pub mod train;
pub mod weights;

#[cfg(feature = "python")]
mod python;

pub use blip::BlipForConditionalGeneration;
pub use config::BlipConfig;
pub use error::{Error, Result};
