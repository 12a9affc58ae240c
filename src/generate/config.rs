//! Decoding settings with transformers' names and defaults, read from the caller's keyword arguments, and the
//! checks made before any work starts. The one definition: the bindings pass the keywords through as they
//! are, and the Python face asks [`GenerationConfig::setting_names`] which keywords are settings.

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::error::{Error, Result};

/// transformers' `early_stopping`: `True`, `False` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    True,
    False,
    Never,
}

impl<'de> Deserialize<'de> for EarlyStopping {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::Bool(true) => Ok(Self::True),
            serde_json::Value::Bool(false) => Ok(Self::False),
            serde_json::Value::String(w) if w == "never" => Ok(Self::Never),
            other => Err(de::Error::custom(format!(
                "early_stopping must be True, False or \"never\", got {other}"
            ))),
        }
    }
}

/// Decoding settings, with transformers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Images at another resolution than the checkpoint's: the vision tower interpolates its position
    /// embeddings (BLIP's `generate(interpolate_pos_encoding=True)`).
    pub interpolate_pos_encoding: bool,
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
            interpolate_pos_encoding: false,
        }
    }
}

impl GenerationConfig {
    /// The settings given as keyword arguments (`{"num_beams": 3, ...}`; absent ones take the defaults),
    /// checked. An unknown keyword is a type error, as for a Python function; a value of the wrong type or out
    /// of range is an invalid argument naming the setting.
    pub fn from_settings(settings: serde_json::Value) -> Result<Self> {
        let config: Self = crate::config::settings_from_keywords(settings, "generate()")?;
        config.validate()?;
        Ok(config)
    }

    /// The names of the settings, in declaration order (what `generate` accepts beyond its tensors).
    pub fn setting_names() -> &'static [&'static str] {
        crate::config::struct_fields::<Self>()
    }

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
        if !self.length_penalty.is_finite() {
            return Err(Error::invalid(format!(
                "length_penalty must be a finite number, got {} (1.0 is neutral)",
                self.length_penalty
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::invalid(format!(
                "repetition_penalty must be a positive finite number, got {} (1.0 is off)",
                self.repetition_penalty
            )));
        }
        for (name, value) in [
            ("no_repeat_ngram_size", self.no_repeat_ngram_size),
            ("min_new_tokens", self.min_new_tokens),
            ("min_length", self.min_length),
        ] {
            if value < 0 {
                return Err(Error::invalid(format!(
                    "{name} must not be negative, got {value} (0 is off)"
                )));
            }
        }
        for (name, value) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = value.filter(|&id| id < 0) {
                return Err(Error::invalid(format!(
                    "{name} must be a token id (0 or more), got {id}; leave it unset for the model's own"
                )));
            }
        }
        Ok(())
    }

    /// The checks that need the model: special ids within its vocabulary.
    pub fn validate_for(&self, vocab_size: i64) -> Result<()> {
        for (name, value) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = value.filter(|&id| id >= vocab_size) {
                return Err(Error::invalid(format!(
                    "{name}={id} is not a token of this model (its vocabulary has ids 0 to {}); leave it unset \
                     for the model's own",
                    vocab_size - 1
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn settings_are_read_by_their_names_with_the_defaults_for_the_rest() {
        let names = GenerationConfig::setting_names();
        assert_eq!(names.len(), 19);
        assert_eq!(names[0], "max_new_tokens");
        assert!(
            names.contains(&"no_repeat_ngram_size")
                && names.contains(&"seed")
                && names.contains(&"interpolate_pos_encoding")
        );
        let c = GenerationConfig::from_settings(json!({"num_beams": 3, "early_stopping": "never"})).unwrap();
        assert_eq!(
            (c.num_beams, c.early_stopping, c.top_k),
            (3, EarlyStopping::Never, 50)
        );
        let c =
            GenerationConfig::from_settings(json!({"early_stopping": true, "max_new_tokens": null})).unwrap();
        assert_eq!((c.early_stopping, c.max_new_tokens), (EarlyStopping::True, None));
    }

    #[test]
    fn unknown_names_wrong_types_and_bad_values_say_which_argument() {
        let err = |v| GenerationConfig::from_settings(v).unwrap_err();
        assert!(
            matches!(err(json!({"beams": 3})), Error::Type(m) if m.contains("unsupported keyword argument \"beams\""))
        );
        assert!(
            matches!(err(json!({"num_beams": "3"})), Error::InvalidArgument(m) if m.contains("num_beams"))
        );
        assert!(
            matches!(err(json!({"early_stopping": "sometimes"})), Error::InvalidArgument(m) if m.contains("early_stopping must be"))
        );
        assert!(matches!(err(json!({"top_p": 0.0})), Error::InvalidArgument(m) if m.contains("top_p")));
    }
}
