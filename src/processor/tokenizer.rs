//! Captions to token ids and back, with the same `tokenizer.json` and the same rules as transformers'
//! fast BERT tokenizer: a call's `padding` / `truncation` / `max_length` / `pad_to_multiple_of` resolved as
//! transformers' `_get_padding_truncation_strategies` resolves them (the one implementation: the Python face
//! passes the arguments through), truncation counting the special tokens inside `max_length`, padding to the
//! longest row or to a fixed length (optionally rounded up to a multiple), and decoding that may apply
//! transformers' `clean_up_tokenization` on top of the tokenizer's own decoder.

use std::path::Path;

use rayon::prelude::*;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::Value;
use tokenizers::utils::padding::{
    pad_encodings, PaddingDirection, PaddingParams, PaddingStrategy as TkPadding,
};
use tokenizers::utils::truncation::{
    truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy as TkTruncation,
};
use tokenizers::{PostProcessor, Tokenizer};

use crate::error::{Error, Result};

/// How rows of a batch are padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    None,
    /// To the longest row of the batch.
    Longest,
    /// To this many tokens (rows already longer stay longer).
    MaxLength(usize),
}

/// transformers' `padding` argument as given (`PaddingStrategy`). `True` and `"longest"` pad alike, and
/// `False` and `"do_not_pad"` do not pad, but transformers tells them apart (`True` warns when `max_length`
/// is ignored; only `False` lets a lone `max_length` turn truncation on). None reads as `"do_not_pad"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PaddingStrategy {
    True,
    Longest,
    MaxLength,
    DoNotPad,
    #[default]
    False,
}

impl<'de> Deserialize<'de> for PaddingStrategy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Bool(true) => Ok(Self::True),
            Value::Bool(false) => Ok(Self::False),
            Value::Null => Ok(Self::DoNotPad),
            Value::String(s) if s == "longest" => Ok(Self::Longest),
            Value::String(s) if s == "max_length" => Ok(Self::MaxLength),
            Value::String(s) if s == "do_not_pad" => Ok(Self::DoNotPad),
            other => Err(de::Error::custom(format!(
                "padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {other}"
            ))),
        }
    }
}

/// transformers' `truncation` argument as given (`TruncationStrategy`; `True` is `"longest_first"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TruncationStrategy {
    LongestFirst,
    OnlyFirst,
    OnlySecond,
    DoNotTruncate,
}

impl<'de> Deserialize<'de> for TruncationStrategy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Bool(true) => Ok(Self::LongestFirst),
            Value::Bool(false) => Ok(Self::DoNotTruncate),
            Value::String(s) if s == "longest_first" => Ok(Self::LongestFirst),
            Value::String(s) if s == "only_first" => Ok(Self::OnlyFirst),
            Value::String(s) if s == "only_second" => Ok(Self::OnlySecond),
            Value::String(s) if s == "do_not_truncate" => Ok(Self::DoNotTruncate),
            other => Err(de::Error::custom(format!(
                "truncation must be True, False, 'longest_first', 'only_first', 'only_second' or \
                 'do_not_truncate', got {other}"
            ))),
        }
    }
}

/// Which end padding or truncation works on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Side {
    Left,
    #[default]
    Right,
}

impl<'de> Deserialize<'de> for Side {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(s) if s == "left" => Ok(Self::Left),
            Value::String(s) if s == "right" => Ok(Self::Right),
            other => Err(de::Error::custom(format!(
                "must be 'left' or 'right', got {other}"
            ))),
        }
    }
}

impl Side {
    /// `"left"` / `"right"`, for the tokenizer's own settings (`tokenizer_config.json`).
    pub fn parse(name: &str, value: &str) -> Result<Self> {
        Self::deserialize(Value::from(value))
            .map_err(|e: serde_json::Error| Error::invalid(format!("{name} {e}")))
    }
}

/// One call's arguments as transformers' tokenizer takes them (`tokenizer(texts, padding=True, ...)`): its
/// names and defaults, before resolution. Read with [`EncodeArgs::from_keywords`].
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncodeArgs {
    pub add_special_tokens: bool,
    pub padding: PaddingStrategy,
    /// None: not given (a lone `max_length` then turns truncation on, as in transformers).
    pub truncation: Option<TruncationStrategy>,
    pub max_length: Option<usize>,
    pub pad_to_multiple_of: Option<usize>,
    /// None: the tokenizer's own side.
    pub padding_side: Option<Side>,
    /// False: no warnings.
    pub verbose: bool,
}

impl Default for EncodeArgs {
    fn default() -> Self {
        Self {
            add_special_tokens: true,
            padding: PaddingStrategy::False,
            truncation: None,
            max_length: None,
            pad_to_multiple_of: None,
            padding_side: None,
            verbose: true,
        }
    }
}

impl EncodeArgs {
    /// The arguments from keywords (`{"padding": true, "max_length": 16}`; absent ones take transformers'
    /// defaults). An unknown keyword is a type error; a bad value an invalid argument naming it.
    pub fn from_keywords(keywords: Value) -> Result<Self> {
        crate::config::settings_from_keywords(keywords, "tokenizer()")
    }
}

/// transformers' `LARGE_INTEGER`: a `model_max_length` above it means "no predefined maximum length".
pub const LARGE_INTEGER: u128 = 100_000_000_000_000_000_000;
/// transformers' `VERY_LARGE_INTEGER` (1e30): the `model_max_length` of a tokenizer that sets none.
pub const VERY_LARGE_INTEGER: u128 = 1_000_000_000_000_000_000_000_000_000_000;

/// What a tokenizer's own configuration (`tokenizer_config.json`) brings to every call.
#[derive(Clone, Debug)]
pub struct TokenizerSettings {
    /// The longest input the model takes; above [`LARGE_INTEGER`]: none.
    pub model_max_length: u128,
    /// The padding token (None: the tokenizer cannot pad).
    pub pad_token: Option<String>,
    pub padding_side: Side,
    pub truncation_side: Side,
}

impl Default for TokenizerSettings {
    fn default() -> Self {
        Self {
            model_max_length: VERY_LARGE_INTEGER,
            pad_token: Some("[PAD]".into()),
            padding_side: Side::Right,
            truncation_side: Side::Right,
        }
    }
}

/// One call's settings, already resolved the way transformers resolves `padding`/`truncation`/`max_length`.
#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    pub add_special_tokens: bool,
    pub padding: Padding,
    pub pad_to_multiple_of: Option<usize>,
    /// Truncate each row to at most this many tokens, special tokens included.
    pub truncation: Option<usize>,
    pub pad_left: bool,
    pub truncate_left: bool,
    pub pad_id: u32,
    pub pad_token: String,
}

/// Token ids with their masks, one row per text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoding {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub token_type_ids: Vec<Vec<u32>>,
}

/// A `tokenizer.json` tokenizer with the call-time padding and truncation of transformers.
#[derive(Clone)]
pub struct BlipTokenizer {
    inner: Tokenizer,
}

/// A template post-processor must define every special token its templates use: the tokenizers crate loads
/// such a file and then panics on every encode ("no entry found for key", found by fuzz/).
fn check_templates(processor: &serde_json::Value) -> Result<()> {
    use serde_json::Value;
    match processor {
        Value::Object(map) if map.get("type").and_then(Value::as_str) == Some("TemplateProcessing") => {
            let defined = map.get("special_tokens").and_then(Value::as_object);
            for part in ["single", "pair"] {
                for piece in map.get(part).and_then(Value::as_array).into_iter().flatten() {
                    let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) else {
                        continue;
                    };
                    if !defined.is_some_and(|d| d.contains_key(id)) {
                        return Err(Error::invalid(format!(
                            "tokenizer.json is malformed: its post_processor's {part} template uses the special \
                             token {id:?}, which its special_tokens do not define"
                        )));
                    }
                }
            }
            Ok(())
        }
        Value::Object(map) => map.values().try_for_each(check_templates),
        Value::Array(items) => items.iter().try_for_each(check_templates),
        _ => Ok(()),
    }
}

fn tk_err(context: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::invalid(format!("{context}: {e}"))
}

impl BlipTokenizer {
    /// Loads `tokenizer.json`. Padding and truncation stored in the file are dropped: transformers sets
    /// them per call, and so do we.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::not_found("tokenizer file", path));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        Self::from_json(&text).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
    }

    /// Parses the JSON text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        // The tokenizers crate panics on some malformed documents (an unwrap in its model deserializer, found
        // by fuzz/): that is bad input here, not a bug of ours.
        let parsed = std::panic::catch_unwind(|| json.parse::<Tokenizer>()).map_err(|_| {
            Error::invalid(
                "cannot load the tokenizer JSON: the document is malformed (its \"model\" section)",
            )
        })?;
        let inner = parsed.map_err(tk_err("cannot load the tokenizer JSON"))?;
        Self::from_tokenizer(inner)
    }

    fn from_tokenizer(mut inner: Tokenizer) -> Result<Self> {
        // BLIP's tokenizer is BERT's WordPiece. Another model's tokenizer.json would load and quietly turn
        // captions into unknown tokens (transformers' BertTokenizer keeps only its vocabulary): refused.
        let kind = match inner.get_model() {
            tokenizers::models::ModelWrapper::WordPiece(_) => None,
            tokenizers::models::ModelWrapper::BPE(_) => Some("BPE"),
            tokenizers::models::ModelWrapper::WordLevel(_) => Some("WordLevel"),
            tokenizers::models::ModelWrapper::Unigram(_) => Some("Unigram"),
        };
        if let Some(kind) = kind {
            return Err(Error::invalid(format!(
                "this tokenizer.json holds a {kind} tokenizer (another model type's); BLIP uses BERT's WordPiece \
                 tokenizer: use the tokenizer.json of a BLIP checkpoint (e.g. Salesforce/blip-image-captioning-base)"
            )));
        }
        check_templates(&serde_json::to_value(inner.get_post_processor()).unwrap_or_default())?;
        inner.with_padding(None);
        // Removing truncation cannot fail (only setting a stride larger than max_length can).
        let _ = inner.with_truncation(None);
        Ok(BlipTokenizer { inner })
    }

    /// The `tokenizer.json` text.
    pub fn to_json(&self, pretty: bool) -> Result<String> {
        self.inner
            .to_string(pretty)
            .map_err(tk_err("cannot serialise tokenizer"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Every token with its id (transformers' `get_vocab()`: the added tokens included when asked).
    pub fn vocab(&self, with_added_tokens: bool) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(with_added_tokens)
    }

    pub fn vocab_size(&self, with_added_tokens: bool) -> usize {
        self.inner.get_vocab_size(with_added_tokens)
    }

    /// Number of special tokens the post-processor adds to a single sequence ([CLS] and [SEP]: 2).
    pub fn num_special_tokens(&self) -> usize {
        self.inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false))
    }

    /// transformers' `_get_padding_truncation_strategies`: the call's arguments and the tokenizer's settings
    /// to the padding and truncation to apply, with the warnings transformers gives (`warnings.warn`) and its
    /// errors. Unlike transformers, `padding=None` reads as `"do_not_pad"` and `pad_to_multiple_of=0` as
    /// unset.
    pub fn resolve(
        &self,
        args: &EncodeArgs,
        settings: &TokenizerSettings,
    ) -> Result<(TokenizeOptions, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut max_length = args.max_length;
        // Backward compatibility in transformers: a lone max_length truncates.
        let truncation = match args.truncation {
            None if max_length.is_some() && args.padding == PaddingStrategy::False => {
                Some(TruncationStrategy::LongestFirst)
            }
            t => t,
        };
        let mut truncate = match truncation {
            Some(TruncationStrategy::LongestFirst | TruncationStrategy::OnlyFirst) => true,
            Some(TruncationStrategy::OnlySecond) => {
                return Err(Error::invalid(
                    "truncation='only_second' needs text pairs, which BLIP does not use",
                ))
            }
            Some(TruncationStrategy::DoNotTruncate) | None => false,
        };
        #[derive(PartialEq)]
        enum Pad {
            No,
            Longest,
            MaxLength,
        }
        let mut pad = match args.padding {
            PaddingStrategy::True => {
                if args.verbose && max_length.is_some() && !truncate {
                    warnings.push(
                        "`max_length` is ignored when `padding`=`True` and there is no truncation strategy. \
                         To pad to max length, use `padding='max_length'`."
                            .to_string(),
                    );
                }
                Pad::Longest
            }
            PaddingStrategy::Longest => Pad::Longest,
            PaddingStrategy::MaxLength => Pad::MaxLength,
            PaddingStrategy::DoNotPad | PaddingStrategy::False => Pad::No,
        };
        let model_max_length = (settings.model_max_length <= LARGE_INTEGER)
            .then(|| usize::try_from(settings.model_max_length).unwrap_or(usize::MAX));
        if max_length.is_none() {
            if pad == Pad::MaxLength {
                match model_max_length {
                    Some(n) => max_length = Some(n),
                    None => pad = Pad::No,
                }
            }
            if truncate {
                match model_max_length {
                    Some(n) => max_length = Some(n),
                    None => truncate = false,
                }
            }
        }
        let pad_id = settings.pad_token.as_deref().and_then(|t| self.token_to_id(t));
        if pad != Pad::No && pad_id.is_none() {
            return Err(Error::invalid(
                "Asking to pad but the tokenizer does not have a padding token. Please select a token to use as \
                 `pad_token` `(tokenizer.pad_token = tokenizer.eos_token e.g.)` or add a new pad token via \
                 `tokenizer.add_special_tokens({'pad_token': '[PAD]'})`.",
            ));
        }
        let pad_to_multiple_of = args.pad_to_multiple_of.filter(|&m| m > 0);
        if let (true, true, Some(multiple), Some(length)) =
            (truncate, pad != Pad::No, pad_to_multiple_of, max_length)
        {
            if length % multiple != 0 {
                return Err(Error::invalid(format!(
                    "Truncation and padding are both activated but truncation length ({length}) is not a \
                     multiple of pad_to_multiple_of ({multiple})."
                )));
            }
        }
        let padding = match (pad, max_length) {
            (Pad::No, _) => Padding::None,
            (Pad::Longest, _) => Padding::Longest,
            (Pad::MaxLength, Some(n)) => Padding::MaxLength(n),
            (Pad::MaxLength, None) => unreachable!("padding to max_length has a length by now"),
        };
        let options = TokenizeOptions {
            add_special_tokens: args.add_special_tokens,
            padding,
            pad_to_multiple_of,
            truncation: if truncate { max_length } else { None },
            pad_left: args.padding_side.unwrap_or(settings.padding_side) == Side::Left,
            truncate_left: settings.truncation_side == Side::Left,
            pad_id: pad_id.unwrap_or(0),
            pad_token: settings.pad_token.clone().unwrap_or_else(|| "[PAD]".into()),
        };
        Ok((options, warnings))
    }

    /// Tokenises a batch of texts as transformers' `tokenizer(texts, **args)` does: the arguments resolved by
    /// [`resolve`](Self::resolve), then [`encode_batch`](Self::encode_batch). Returns the warnings too.
    pub fn encode<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        args: &EncodeArgs,
        settings: &TokenizerSettings,
    ) -> Result<(Encoding, Vec<String>)> {
        let (options, warnings) = self.resolve(args, settings)?;
        Ok((self.encode_batch(texts, &options)?, warnings))
    }

    /// Tokenises a batch of texts (in parallel) with settings already resolved.
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        opts: &TokenizeOptions,
    ) -> Result<Encoding> {
        let added = if opts.add_special_tokens {
            self.num_special_tokens()
        } else {
            0
        };
        let truncation = match opts.truncation {
            Some(max) if max < added => {
                return Err(Error::invalid(format!(
                    "max_length={max} is smaller than the {added} special tokens added to every sequence"
                )))
            }
            Some(max) => Some(TruncationParams {
                max_length: max - added,
                strategy: TkTruncation::LongestFirst,
                stride: 0,
                direction: if opts.truncate_left {
                    TruncationDirection::Left
                } else {
                    TruncationDirection::Right
                },
            }),
            None => None,
        };
        let encodings: Vec<Result<tokenizers::Encoding>> = texts
            .par_iter()
            .enumerate()
            .map(|(i, text)| {
                let context = format!("cannot tokenize text {i}");
                let enc = self
                    .inner
                    .encode(text.as_ref(), false)
                    .map_err(tk_err(&context))?;
                let enc = match &truncation {
                    Some(params) => truncate_encodings(enc, None, params).map_err(tk_err(&context))?.0,
                    None => enc,
                };
                self.inner
                    .post_process(enc, None, opts.add_special_tokens)
                    .map_err(tk_err(&context))
            })
            .collect();
        let mut encodings = encodings.into_iter().collect::<Result<Vec<_>>>()?;
        let strategy = match opts.padding {
            Padding::None => None,
            Padding::Longest => Some(TkPadding::BatchLongest),
            Padding::MaxLength(n) => Some(TkPadding::Fixed(n)),
        };
        if let Some(strategy) = strategy {
            let params = PaddingParams {
                strategy,
                direction: if opts.pad_left {
                    PaddingDirection::Left
                } else {
                    PaddingDirection::Right
                },
                pad_to_multiple_of: opts.pad_to_multiple_of.filter(|&m| m > 0),
                pad_id: opts.pad_id,
                pad_type_id: 0,
                pad_token: opts.pad_token.clone(),
            };
            pad_encodings(&mut encodings, &params).map_err(tk_err("cannot pad"))?;
        }
        let mut out = Encoding::default();
        for e in encodings {
            out.input_ids.push(e.get_ids().to_vec());
            out.attention_mask.push(e.get_attention_mask().to_vec());
            out.token_type_ids.push(e.get_type_ids().to_vec());
        }
        Ok(out)
    }

    /// Decodes rows of ids to text, as transformers' `batch_decode` does. Ids outside the vocabulary
    /// are skipped, as the tokenizers library skips them.
    pub fn decode_batch(
        &self,
        rows: &[Vec<u32>],
        skip_special_tokens: bool,
        clean_up_spaces: bool,
    ) -> Result<Vec<String>> {
        let texts: Vec<Result<String>> = rows
            .par_iter()
            .enumerate()
            .map(|(i, ids)| {
                let text = self
                    .inner
                    .decode(ids, skip_special_tokens)
                    .map_err(tk_err(&format!("cannot decode row {i}")))?;
                Ok(if clean_up_spaces {
                    clean_up_tokenization(&text)
                } else {
                    text
                })
            })
            .collect();
        texts.into_iter().collect()
    }
}

/// transformers' `clean_up_tokenization`: removes the spaces WordPiece decoding leaves before
/// punctuation and English contractions, in the same order of replacements.
pub fn clean_up_tokenization(text: &str) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    RULES
        .iter()
        .fold(text.to_string(), |acc, (from, to)| acc.replace(from, to))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Whitespace words over a tiny WordPiece vocabulary (each word a whole piece), with BERT's [CLS] ... [SEP].
    fn tiny() -> BlipTokenizer {
        let words = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c", "d", "e", "f", "g", "h",
        ];
        let vocab: serde_json::Map<String, Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), json!(i)))
            .collect();
        let added: Vec<Value> = words[..4]
            .iter()
            .enumerate()
            .map(|(i, w)| {
                json!({"id": i, "content": w, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let json = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
            "decoder": null,
            "model": {"type": "WordPiece", "vocab": vocab, "unk_token": "[UNK]",
                      "continuing_subword_prefix": "##", "max_input_chars_per_word": 100}
        });
        BlipTokenizer::from_json(&json.to_string()).unwrap()
    }

    const TEXTS: [&str; 2] = ["a b c d e f", "g h"];

    fn encode(args: Value, settings: &TokenizerSettings) -> Result<(Vec<Vec<u32>>, Vec<String>)> {
        let args = EncodeArgs::from_keywords(args)?;
        tiny()
            .encode(&TEXTS, &args, settings)
            .map(|(e, w)| (e.input_ids, w))
    }

    fn lengths(args: Value, settings: &TokenizerSettings) -> Vec<usize> {
        encode(args, settings).unwrap().0.iter().map(Vec::len).collect()
    }

    #[test]
    fn padding_and_truncation_resolve_as_in_transformers() {
        let no_limit = TokenizerSettings::default();
        let limit5 = TokenizerSettings {
            model_max_length: 5,
            ..Default::default()
        };
        // Defaults: neither; a lone max_length truncates (transformers' backward compatibility).
        assert_eq!(lengths(json!({}), &no_limit), [8, 4]);
        assert_eq!(lengths(json!({"max_length": 4}), &no_limit), [4, 4]);
        assert_eq!(
            lengths(json!({"max_length": 4, "padding": "do_not_pad"}), &no_limit),
            [8, 4]
        );
        assert_eq!(lengths(json!({"padding": true}), &no_limit), [8, 8]);
        assert_eq!(
            lengths(json!({"padding": "longest", "max_length": 3}), &no_limit),
            [8, 8]
        );
        assert_eq!(lengths(json!({"padding": null}), &no_limit), [8, 4]);
        // max_length falls back to model_max_length, and a huge one means "none".
        assert_eq!(lengths(json!({"padding": "max_length"}), &no_limit), [8, 4]);
        assert_eq!(lengths(json!({"padding": "max_length"}), &limit5), [8, 5]);
        assert_eq!(lengths(json!({"truncation": true}), &no_limit), [8, 4]);
        assert_eq!(lengths(json!({"truncation": "only_first"}), &limit5), [5, 4]);
        assert_eq!(
            lengths(
                json!({"padding": "max_length", "truncation": "longest_first"}),
                &limit5
            ),
            [5, 5]
        );
        assert_eq!(
            lengths(
                json!({"padding": "max_length", "max_length": 10, "truncation": false}),
                &limit5
            ),
            [10, 10]
        );
        assert_eq!(
            lengths(json!({"padding": true, "pad_to_multiple_of": 3}), &no_limit),
            [9, 9]
        );
        assert_eq!(
            lengths(json!({"padding": true, "pad_to_multiple_of": 0}), &no_limit),
            [8, 8]
        );
        assert_eq!(
            lengths(json!({"max_length": 3, "add_special_tokens": false}), &no_limit),
            [3, 2]
        );
    }

    #[test]
    fn sides_come_from_the_call_or_the_tokenizer() {
        let left = TokenizerSettings {
            padding_side: Side::Left,
            truncation_side: Side::Left,
            ..Default::default()
        };
        let (ids, _) = encode(
            json!({"padding": true, "max_length": 3, "truncation": true}),
            &left,
        )
        .unwrap();
        assert_eq!(ids, [vec![2, 9, 3], vec![2, 11, 3]]);
        let (ids, _) = encode(json!({"padding": true}), &left).unwrap();
        assert_eq!(ids[1], [0, 0, 0, 0, 2, 10, 11, 3]);
        let (ids, _) = encode(json!({"padding": true, "padding_side": "right"}), &left).unwrap();
        assert_eq!(ids[1], [2, 10, 11, 3, 0, 0, 0, 0]);
        assert_eq!(Side::parse("truncation_side", "left").unwrap(), Side::Left);
        let e = Side::parse("truncation_side", "middle").unwrap_err().to_string();
        assert!(e.starts_with("truncation_side must be 'left' or 'right'"), "{e}");
    }

    #[test]
    fn transformers_warning_and_errors() {
        let settings = TokenizerSettings::default();
        let (_, warnings) = encode(json!({"padding": true, "max_length": 4}), &settings).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("`max_length` is ignored when `padding`=`True`"));
        let (_, warnings) = encode(json!({"padding": "longest", "max_length": 4}), &settings).unwrap();
        assert!(warnings.is_empty());
        let (_, warnings) = encode(
            json!({"padding": true, "max_length": 4, "verbose": false}),
            &settings,
        )
        .unwrap();
        assert!(warnings.is_empty());
        let (_, warnings) = encode(
            json!({"padding": true, "max_length": 4, "truncation": true}),
            &settings,
        )
        .unwrap();
        assert!(warnings.is_empty());

        let invalid = |args: Value, settings: &TokenizerSettings, message: &str| {
            let e = encode(args.clone(), settings).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument(ref m) if m.contains(message)),
                "{args}: {e}"
            );
        };
        let no_pad = TokenizerSettings {
            pad_token: None,
            ..Default::default()
        };
        invalid(
            json!({"padding": true}),
            &no_pad,
            "Asking to pad but the tokenizer does not have a padding token",
        );
        let unknown_pad = TokenizerSettings {
            pad_token: Some("[NOPE]".into()),
            ..Default::default()
        };
        invalid(
            json!({"padding": "max_length", "max_length": 4}),
            &unknown_pad,
            "padding token",
        );
        encode(json!({"max_length": 4}), &no_pad).unwrap();
        invalid(
            json!({"padding": true, "truncation": true, "max_length": 6, "pad_to_multiple_of": 4}),
            &settings,
            "truncation length (6) is not a multiple of pad_to_multiple_of (4)",
        );
        invalid(
            json!({"truncation": "only_second"}),
            &settings,
            "needs text pairs",
        );
        invalid(
            json!({"padding": "sideways"}),
            &settings,
            "argument padding: padding must be True, False",
        );
        invalid(
            json!({"truncation": "middle"}),
            &settings,
            "argument truncation: truncation must be",
        );
        invalid(json!({"max_length": -1}), &settings, "argument max_length");
        invalid(
            json!({"pad_to_multiple_of": "8"}),
            &settings,
            "argument pad_to_multiple_of",
        );
        invalid(
            json!({"padding_side": "up"}),
            &settings,
            "argument padding_side: must be 'left' or 'right'",
        );
        invalid(
            json!({"truncation": true, "max_length": 1}),
            &settings,
            "smaller than the 2 special tokens",
        );
        let e = encode(json!({"stride": 2}), &settings).unwrap_err();
        assert!(matches!(e, Error::Type(ref m) if m.contains("\"stride\"")), "{e}");
    }

    #[test]
    fn clean_up_matches_transformers_rules() {
        assert_eq!(
            clean_up_tokenization("it ' s a dog , it do n't bark ?"),
            "it's a dog, it don't bark?"
        );
        assert_eq!(
            clean_up_tokenization("we 're here . you 've won !"),
            "we're here. you've won!"
        );
    }
}
