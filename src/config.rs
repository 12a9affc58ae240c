//! The BLIP configuration, read from a transformers `config.json`. Field names are the JSON keys and
//! defaults are transformers' defaults, so a checkpoint folder made by transformers loads as-is. The
//! whole JSON document is kept, so that saving writes back every field we do not interpret.

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Settings of the ViT image encoder (`vision_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub projection_dim: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub attention_dropout: f64,
    pub initializer_range: f64,
}

impl Default for BlipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 384,
            patch_size: 16,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            initializer_range: 1e-10,
        }
    }
}

/// Settings of the BERT-style caption decoder (`text_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub encoder_hidden_size: i64,
    pub intermediate_size: i64,
    pub projection_dim: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub initializer_range: f64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
    pub pad_token_id: i64,
    pub sep_token_id: i64,
    pub is_decoder: bool,
    pub use_cache: bool,
    pub label_smoothing: f64,
    pub tie_word_embeddings: bool,
}

impl Default for BlipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            bos_token_id: 30522,
            eos_token_id: 2,
            pad_token_id: 0,
            sep_token_id: 102,
            is_decoder: true,
            use_cache: true,
            label_smoothing: 0.0,
            tie_word_embeddings: true,
        }
    }
}

/// The whole model configuration: the two towers plus the original JSON document.
#[derive(Debug, Clone)]
pub struct BlipConfig {
    pub text_config: BlipTextConfig,
    pub vision_config: BlipVisionConfig,
    /// The parsed `config.json` as read (or as built), written back by `to_json`.
    raw: Value,
}

/// The activations transformers' `ACT2FN` knows that BLIP configs use.
pub const SUPPORTED_ACTIVATIONS: &[&str] = &[
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
];

fn parse_section<T: DeserializeOwned>(value: &Value, section: &str) -> Result<T> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        Error::config(format!(
            "config.json: field `{section}.{path}` is invalid: {}",
            e.inner()
        ))
    })
}

impl BlipConfig {
    /// Parses a `config.json` document.
    pub fn from_json(raw: Value) -> Result<Self> {
        let Value::Object(obj) = &raw else {
            return Err(Error::config("config.json must hold a JSON object"));
        };
        if let Some(model_type) = obj.get("model_type").and_then(Value::as_str) {
            if model_type != "blip" {
                return Err(Error::config(format!(
                    "config.json: field `model_type` is {model_type:?}; only BLIP checkpoints (\"blip\", \
                     e.g. Salesforce/blip-image-captioning-base) are supported"
                )));
            }
        }
        let empty = Value::Object(Default::default());
        let text_raw = obj.get("text_config").unwrap_or(&empty);
        let vision_raw = obj.get("vision_config").unwrap_or(&empty);
        for (name, section) in [("text_config", text_raw), ("vision_config", vision_raw)] {
            if !section.is_object() && !section.is_null() {
                return Err(Error::config(format!(
                    "config.json: field `{name}` must be an object"
                )));
            }
        }
        let mut text_config: BlipTextConfig = if text_raw.is_null() {
            Default::default()
        } else {
            parse_section(text_raw, "text_config")?
        };
        let vision_config: BlipVisionConfig = if vision_raw.is_null() {
            Default::default()
        } else {
            parse_section(vision_raw, "vision_config")?
        };
        // transformers' BlipConfig forces the decoder's cross-attention width to the image width.
        text_config.encoder_hidden_size = vision_config.hidden_size;
        let config = Self {
            text_config,
            vision_config,
            raw,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses `path` (a `config.json` file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::not_found("config.json", path),
            _ => Error::io(format!("cannot read {}", path.display()), e),
        })?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(format!("{} is not valid JSON: {e}", path.display())))?;
        Self::from_json(raw)
    }

    /// Builds a configuration from the two sections (used by tests and the bundled-model script).
    pub fn new(text_config: BlipTextConfig, vision_config: BlipVisionConfig) -> Result<Self> {
        let raw = serde_json::json!({
            "architectures": ["BlipForConditionalGeneration"],
            "model_type": "blip",
            "text_config": text_config,
            "vision_config": vision_config,
            "tie_word_embeddings": text_config.tie_word_embeddings,
        });
        Self::from_json(raw)
    }

    fn validate(&self) -> Result<()> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let positive: [(&str, i64); 13] = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.max_position_embeddings", t.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value <= 0 {
                return Err(Error::config(format!(
                    "config.json: field `{name}` must be positive, got {value}"
                )));
            }
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return Err(Error::config(format!(
                "config.json: field `vision_config.hidden_size` ({}) must be a multiple of \
                 `vision_config.num_attention_heads` ({})",
                v.hidden_size, v.num_attention_heads
            )));
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(Error::config(format!(
                "config.json: field `text_config.hidden_size` ({}) must be a multiple of \
                 `text_config.num_attention_heads` ({})",
                t.hidden_size, t.num_attention_heads
            )));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(Error::config(format!(
                "config.json: field `vision_config.image_size` ({}) must be a multiple of \
                 `vision_config.patch_size` ({})",
                v.image_size, v.patch_size
            )));
        }
        for (name, act) in [
            ("vision_config.hidden_act", &v.hidden_act),
            ("text_config.hidden_act", &t.hidden_act),
        ] {
            if !SUPPORTED_ACTIVATIONS.contains(&act.as_str()) {
                return Err(Error::config(format!(
                    "config.json: field `{name}` is {act:?}; supported: {}",
                    SUPPORTED_ACTIVATIONS.join(", ")
                )));
            }
        }
        for (name, p) in [
            ("vision_config.attention_dropout", v.attention_dropout),
            ("text_config.hidden_dropout_prob", t.hidden_dropout_prob),
            (
                "text_config.attention_probs_dropout_prob",
                t.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(format!(
                    "config.json: field `{name}` must be in [0, 1), got {p}"
                )));
            }
        }
        if !(0.0..=1.0).contains(&t.label_smoothing) {
            return Err(Error::config(format!(
                "config.json: field `text_config.label_smoothing` must be in [0, 1], got {}",
                t.label_smoothing
            )));
        }
        // The padding id is the word embeddings' `padding_idx`, which torch (and so transformers) refuses
        // outside the table. The other special ids are only compared with tokens, or indexed where they are
        // used (BOS by `generate`, which checks it there): out of range they are a warning, as in transformers.
        if t.pad_token_id < 0 || t.pad_token_id >= t.vocab_size {
            return Err(Error::config(format!(
                "config.json: field `text_config.pad_token_id` ({}) must be a token id below \
                 `text_config.vocab_size` ({}): it is the word embeddings' padding_idx",
                t.pad_token_id, t.vocab_size
            )));
        }
        Ok(())
    }

    /// What transformers warns about when it loads this configuration, and we too: special token ids outside
    /// the vocabulary (harmless unless they are used: `generate` refuses a BOS it would have to embed, and an
    /// EOS outside the vocabulary is simply never produced).
    pub fn warnings(&self) -> Vec<String> {
        let t = &self.text_config;
        [
            ("bos_token_id", t.bos_token_id),
            ("eos_token_id", t.eos_token_id),
            ("sep_token_id", t.sep_token_id),
        ]
        .into_iter()
        .filter(|&(_, id)| id < 0 || id >= t.vocab_size)
        .map(|(name, id)| {
            format!(
                "config.json: text_config.{name} ({id}) is not a token id of the vocabulary (0 to {}); it \
                 is never generated, and generate() refuses it where it would be embedded",
                t.vocab_size - 1
            )
        })
        .collect()
    }

    /// Whether the LM head's decoder weight is the word-embedding matrix (and its bias
    /// `cls.predictions.bias`). As in transformers 5: the head is tied when the top-level field (default
    /// true) or `text_config.tie_word_embeddings` (the decoder's own model reads it) says so; the two
    /// mappings of tied keys are merged, so either one ties.
    pub fn tie_word_embeddings(&self) -> bool {
        let top = self
            .raw
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        top || self.text_config.tie_word_embeddings
    }

    /// The width of the retrieval head's image and text projections (`image_text_hidden_size`, default 256, as
    /// transformers' `BlipConfig`).
    pub fn image_text_hidden_size(&self) -> i64 {
        self.raw
            .get("image_text_hidden_size")
            .and_then(Value::as_i64)
            .unwrap_or(256)
    }

    /// Number of image patches plus the class token: the length of the image-embedding sequence.
    pub fn num_image_tokens(&self) -> i64 {
        let grid = self.vision_config.image_size / self.vision_config.patch_size;
        grid * grid + 1
    }

    /// The configuration as a JSON document: the original document with the two sections updated.
    pub fn to_json(&self) -> Value {
        let mut raw = self.raw.clone();
        if let Value::Object(obj) = &mut raw {
            merge_into(obj, "text_config", &self.text_config);
            merge_into(obj, "vision_config", &self.vision_config);
            obj.entry("model_type").or_insert_with(|| Value::from("blip"));
            obj.entry("architectures")
                .or_insert_with(|| serde_json::json!(["BlipForConditionalGeneration"]));
        }
        raw
    }

    /// Sets a top-level field of the JSON document (e.g. `dtype` when saving).
    pub fn set_raw_field(&mut self, key: &str, value: Value) {
        if let Value::Object(obj) = &mut self.raw {
            obj.insert(key.to_string(), value);
        }
    }
}

/// Writes the fields of `section` over those of the same-named object in `obj`, keeping unknown keys.
fn merge_into<T: Serialize>(obj: &mut serde_json::Map<String, Value>, key: &str, section: &T) {
    let Ok(Value::Object(fields)) = serde_json::to_value(section) else {
        return;
    };
    let target = obj
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Default::default()));
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(target) = target {
        for (k, v) in fields {
            target.insert(k, v);
        }
    }
}

/// A settings struct from the keyword arguments a caller gave (`{"name": value, ...}`; the struct's serde
/// defaults fill the rest). An unknown keyword is a type error, as for a Python function; a value of the wrong
/// type is an invalid argument naming the setting. `call` names the function in messages (`"train()"`).
pub fn settings_from_keywords<T: DeserializeOwned>(keywords: Value, call: &str) -> Result<T> {
    if let Some(map) = keywords.as_object() {
        let known = struct_fields::<T>();
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(Error::type_error(format!(
                "{call} got an unsupported keyword argument {key:?}"
            )));
        }
    }
    serde_path_to_error::deserialize(keywords).map_err(|e| {
        let setting = e.path().to_string();
        Error::invalid(format!(
            "{call} argument {setting}: {}",
            plain_type_error(&e.inner().to_string())
        ))
    })
}

/// serde's type errors in a Python caller's words: "invalid value: integer `-1`, expected usize" names Rust's
/// types; the caller passed a Python value and needs to know which kind is wanted. Other messages pass through.
fn plain_type_error(message: &str) -> String {
    let Some((found, expected)) = message
        .strip_prefix("invalid value: ")
        .or_else(|| message.strip_prefix("invalid type: "))
        .and_then(|rest| rest.rsplit_once(", expected "))
    else {
        return message.to_string();
    };
    let got = found
        .trim_start_matches("integer ")
        .trim_start_matches("floating point ")
        .trim_start_matches("string ")
        .trim_matches('`');
    let wanted = match expected {
        "usize" | "u8" | "u16" | "u32" | "u64" | "u128" => "a non-negative int",
        "isize" | "i8" | "i16" | "i32" | "i64" | "i128" => "an int",
        "f32" | "f64" => "a number",
        "a boolean" => "True or False",
        "a string" => "a str",
        other => other,
    };
    format!("must be {wanted}, got {got}")
}

/// The field names a `#[derive(Deserialize)]` struct accepts, as serde's derive lists them (so the names are
/// written once, in the struct). Read by asking the struct to deserialize from a source that records the
/// field list it is offered and then declines.
pub fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};

    #[derive(Debug)]
    struct Declined;
    impl std::fmt::Display for Declined {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names read")
        }
    }
    impl std::error::Error for Declined {}
    impl serde::de::Error for Declined {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Declined
        }
    }

    struct Recorder<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Recorder<'_> {
        type Error = Declined;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, Declined> {
            Err(Declined::custom(""))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> std::result::Result<V::Value, Declined> {
            *self.0 = fields;
            Err(Declined)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Recorder(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_type_errors_name_python_kinds() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Args {
            max_length: Option<usize>,
            flag: Option<bool>,
        }
        let err = |v| settings_from_keywords::<Args>(v, "f()").unwrap_err().to_string();
        let negative = err(serde_json::json!({"max_length": -1}));
        assert!(
            negative.contains("f() argument max_length: must be a non-negative int, got -1"),
            "{negative}"
        );
        let float = err(serde_json::json!({"max_length": 2.5}));
        assert!(float.contains("must be a non-negative int, got 2.5"), "{float}");
        let flag = err(serde_json::json!({"flag": "yes"}));
        assert!(
            flag.contains("argument flag: must be True or False, got \"yes\""),
            "{flag}"
        );
    }

    #[test]
    fn defaults_are_transformers_defaults() {
        let c = BlipConfig::from_json(serde_json::json!({"model_type": "blip"})).unwrap();
        assert_eq!(c.text_config.vocab_size, 30524);
        assert_eq!(c.text_config.num_attention_heads, 8);
        assert_eq!(c.vision_config.image_size, 384);
        assert_eq!(c.num_image_tokens(), 577);
        assert!(c.tie_word_embeddings());
    }

    #[test]
    fn bad_field_is_named() {
        let err = BlipConfig::from_json(serde_json::json!({"text_config": {"hidden_size": "big"}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("text_config.hidden_size"), "{err}");
        let err = BlipConfig::from_json(serde_json::json!({"vision_config": {"hidden_size": 30}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
    }

    #[test]
    fn either_tie_flag_ties_the_head() {
        let tied = |top: bool, text: bool| {
            BlipConfig::from_json(serde_json::json!({
                "tie_word_embeddings": top, "text_config": {"tie_word_embeddings": text}
            }))
            .unwrap()
            .tie_word_embeddings()
        };
        assert!(tied(true, true) && tied(true, false) && tied(false, true));
        assert!(!tied(false, false));
    }

    #[test]
    fn special_ids_outside_the_vocabulary_warn_and_pad_is_refused() {
        let c = BlipConfig::from_json(serde_json::json!({
            "text_config": {"vocab_size": 99, "bos_token_id": 97, "sep_token_id": 102}
        }))
        .unwrap();
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("sep_token_id"), "{warnings:?}");
        let err = BlipConfig::from_json(serde_json::json!({
            "text_config": {"vocab_size": 99, "bos_token_id": 97, "pad_token_id": 99}
        }))
        .unwrap_err()
        .to_string();
        assert!(err.contains("pad_token_id"), "{err}");
    }

    #[test]
    fn unknown_fields_survive_round_trip() {
        let c = BlipConfig::from_json(serde_json::json!({"model_type": "blip", "foo": 3})).unwrap();
        assert_eq!(c.to_json()["foo"], 3);
    }
}
