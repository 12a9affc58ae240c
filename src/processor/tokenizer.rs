//! Captions to token ids and back, with the same `tokenizer.json` and the same rules as transformers'
//! fast BERT tokenizer: truncation counts the special tokens inside `max_length`, padding goes to the
//! longest row or to a fixed length (optionally rounded up to a multiple), and decoding may apply
//! transformers' `clean_up_tokenization` on top of the tokenizer's own decoder.

use std::path::Path;

use rayon::prelude::*;
use tokenizers::utils::padding::{pad_encodings, PaddingDirection, PaddingParams, PaddingStrategy};
use tokenizers::utils::truncation::{
    truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
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
            Error::invalid("cannot parse tokenizer JSON: the document is malformed (its \"model\" section)")
        })?;
        let inner = parsed.map_err(tk_err("cannot parse tokenizer JSON"))?;
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

    pub fn vocab_size(&self, with_added_tokens: bool) -> usize {
        self.inner.get_vocab_size(with_added_tokens)
    }

    /// Number of special tokens the post-processor adds to a single sequence ([CLS] and [SEP]: 2).
    pub fn num_special_tokens(&self) -> usize {
        self.inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false))
    }

    /// Tokenises a batch of texts (in parallel).
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
                strategy: TruncationStrategy::LongestFirst,
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
            Padding::Longest => Some(PaddingStrategy::BatchLongest),
            Padding::MaxLength(n) => Some(PaddingStrategy::Fixed(n)),
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
    use super::*;

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
