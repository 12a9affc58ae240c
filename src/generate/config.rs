//! Decoding settings with transformers' names and defaults, and the checks made before any work starts.

use crate::error::{Error, Result};

/// transformers' `early_stopping`: `True`, `False` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    True,
    False,
    Never,
}

/// Decoding settings, with transformers' names and defaults.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: Option<i64>,
    pub max_length: Option<i64>,
    pub min_new_tokens: i64,
    pub min_length: i64,
    pub num_beams: i64,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub num_return_sequences: i64,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub no_repeat_ngram_size: i64,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
    pub seed: Option<i64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            max_length: None,
            min_new_tokens: 0,
            min_length: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            seed: None,
        }
    }
}

impl GenerationConfig {
    /// The checks transformers makes (and a few it leaves to a crash), before any work starts.
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = self.max_new_tokens {
            if m < 1 {
                return Err(Error::invalid(format!(
                    "max_new_tokens must be at least 1, got {m}"
                )));
            }
        }
        if let Some(m) = self.max_length {
            if m < 1 {
                return Err(Error::invalid(format!("max_length must be at least 1, got {m}")));
            }
        }
        if self.num_beams < 1 {
            return Err(Error::invalid(format!(
                "num_beams must be at least 1, got {}",
                self.num_beams
            )));
        }
        if self.num_return_sequences < 1 {
            return Err(Error::invalid(format!(
                "num_return_sequences must be at least 1, got {}",
                self.num_return_sequences
            )));
        }
        if !self.do_sample && self.num_return_sequences > self.num_beams {
            return Err(Error::invalid(format!(
                "num_return_sequences ({}) cannot exceed num_beams ({}) without sampling; set do_sample=True or \
                 raise num_beams",
                self.num_return_sequences, self.num_beams
            )));
        }
        if self.do_sample && self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return Err(Error::invalid(
                "num_return_sequences cannot exceed num_beams in beam sampling",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return Err(Error::invalid(format!(
                "temperature must be a positive number, got {} (use do_sample=False for greedy decoding)",
                self.temperature
            )));
        }
        if self.top_k < 0 {
            return Err(Error::invalid(format!(
                "top_k must be 0 (off) or positive, got {}",
                self.top_k
            )));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(Error::invalid(format!(
                "repetition_penalty must be positive, got {}",
                self.repetition_penalty
            )));
        }
        if self.no_repeat_ngram_size < 0 || self.min_new_tokens < 0 || self.min_length < 0 {
            return Err(Error::invalid(
                "no_repeat_ngram_size, min_new_tokens and min_length must not be negative",
            ));
        }
        Ok(())
    }
}
