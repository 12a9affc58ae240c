//! What the Rust integration tests share: the tiny model's shapes and the lock on libtorch's one random
//! generator. (Each test file is its own crate and uses a part of this, hence the allow.)
#![allow(dead_code)]

use blip_peft::config::{BlipTextConfig, BlipVisionConfig};
use blip_peft::BlipConfig;

/// Tests run on parallel threads and libtorch has one global random generator: tests that draw from it
/// (random weights, random inputs, seeded sampling) hold this lock, so a seed gives the same numbers.
pub fn global_rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The tiny decoder's shapes (the Python suite's TINY_TEXT).
pub fn tiny_text() -> BlipTextConfig {
    BlipTextConfig {
        vocab_size: 99,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 40,
        bos_token_id: 97,
        sep_token_id: 3,
        pad_token_id: 0,
        ..Default::default()
    }
}

/// The tiny image encoder's shapes (the Python suite's TINY_VISION, with transformers' initializer range).
pub fn tiny_vision() -> BlipVisionConfig {
    BlipVisionConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        image_size: 32,
        patch_size: 8,
        ..Default::default()
    }
}

pub fn tiny_config() -> BlipConfig {
    BlipConfig::new(tiny_text(), tiny_vision()).unwrap()
}
