//! Caption metrics as the field computes them: pycocoevalcap 1.2's BLEU-1..4, ROUGE-L and CIDEr-D, over
//! several references per image, with their exact arithmetic (so the numbers equal pycocoevalcap's), plus a
//! Java-free stand-in for the PTB tokenisation its `COCOEvalCap` runs first.
//!
//! What pycocoevalcap computes, and this module with it:
//! - **BLEU** (`bleu/bleu_scorer.py`, option `"closest"`): corpus level. Words are `str.split()`'s; clipped
//!   n-gram matches (each n-gram at most as often as in the reference holding it most) and n-gram counts are
//!   summed over the corpus; `Bleu_n` is the geometric mean of precisions 1..n, each
//!   `(matched + 1e-15) / (total + 1e-9)` (so no match gives a tiny number, not 0), times the brevity
//!   penalty `exp(1 - r / c)` when `c < r`, `c` the total candidate length and `r` the sum over images of
//!   the reference length closest to the candidate's (the shorter on ties), with the same 1e-15 / 1e-9
//!   guards on the ratio.
//! - **ROUGE-L** (`rouge/rouge.py`): words are `str.split(" ")`'s (single spaces; an empty caption is one
//!   empty word); per image, the longest common subsequence with each reference gives a precision and a
//!   recall, the maxima over references make an F-measure with beta 1.2; the score is the mean over images.
//! - **CIDEr-D** (`cider/cider_scorer.py`): words are `str.split()`'s; the document frequency of an n-gram
//!   (n = 1..4) is the number of images whose references hold it, over the references given (the corpus
//!   scored is its own reference set); a caption is four tf-idf vectors `tf * (ln(images) - ln(max(1, df)))`;
//!   per reference, the cosine of each n's vectors with the candidate's clipped to the reference's values
//!   (`sum min(h, r) * r / (|h| |r|)`), times the Gaussian length penalty `exp(-d^2 / (2 * 6^2))`, `d` the
//!   difference of the two captions' *bigram* counts (pycocoevalcap counts lengths as bigrams); the mean over
//!   n, averaged over references, times 10, is the image's score; the score is the mean over images.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Orders of n-grams the scores use (pycocoevalcap's default n = 4 for BLEU and CIDEr).
const N: usize = 4;
/// CIDEr-D's length penalty width (pycocoevalcap's `sigma=6.0`).
const SIGMA: f64 = 6.0;
/// ROUGE-L's F-measure weight (pycocoevalcap's `beta = 1.2`).
const BETA: f64 = 1.2;

/// The corpus scores under pycocoevalcap's names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaptionScores {
    /// `Bleu_1` .. `Bleu_4`.
    pub bleu: [f64; N],
    /// `ROUGE_L`.
    pub rouge_l: f64,
    /// `CIDEr` (CIDEr-D, x10 as pycocoevalcap reports it).
    pub cider: f64,
}

impl CaptionScores {
    /// The scores as pycocoevalcap's `COCOEvalCap.eval` names them, in its order.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("Bleu_1", self.bleu[0]),
            ("Bleu_2", self.bleu[1]),
            ("Bleu_3", self.bleu[2]),
            ("Bleu_4", self.bleu[3]),
            ("ROUGE_L", self.rouge_l),
            ("CIDEr", self.cider),
        ]
    }
}

/// A small fast hasher (FxHash's multiply-rotate) for interned ids and packed n-grams: the keys are ours,
/// not an attacker's, so SipHash's protection is not needed.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// An n-gram of interned word ids (each id + 1, in 32 bits, first word lowest): unique across orders.
type Gram = u128;

/// Python's `str.isspace` for the characters `str.split()` splits on: Unicode white space plus the four
/// information separators U+001C..U+001F, which Python counts and Rust's `char::is_whitespace` does not.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A caption's words as ids, interned in one table for the whole call.
struct Interner<'a> {
    ids: FxMap<&'a str, u32>,
}

impl<'a> Interner<'a> {
    fn new() -> Self {
        Interner {
            ids: FxMap::default(),
        }
    }
    fn id(&mut self, word: &'a str) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(word).or_insert(next)
    }
    /// `str.split()`'s words (BLEU, CIDEr).
    fn words(&mut self, s: &'a str) -> Vec<u32> {
        s.split(is_python_space)
            .filter(|w| !w.is_empty())
            .map(|w| self.id(w))
            .collect()
    }
    /// `str.split(" ")`'s words (ROUGE-L): empty words kept.
    fn space_words(&mut self, s: &'a str) -> Vec<u32> {
        s.split(' ').map(|w| self.id(w)).collect()
    }
}

/// A caption's n-grams of orders 1..=4 with their counts, sorted by n-gram (a merge join finds the shared
/// ones), and its length in words.
struct Counts {
    grams: Vec<(Gram, u32)>,
    words: usize,
}

fn gram_order(g: Gram) -> usize {
    (0..N).filter(|i| (g >> (32 * i)) as u32 != 0).count()
}

impl Counts {
    fn of(words: &[u32]) -> Counts {
        let mut all = Vec::with_capacity(words.len() * N);
        for i in 0..words.len() {
            let mut g: Gram = 0;
            for (k, &w) in words[i..].iter().take(N).enumerate() {
                g |= Gram::from(w + 1) << (32 * k);
                all.push(g);
            }
        }
        all.sort_unstable();
        let mut grams: Vec<(Gram, u32)> = Vec::with_capacity(all.len());
        for g in all {
            match grams.last_mut() {
                Some((last, c)) if *last == g => *c += 1,
                _ => grams.push((g, 1)),
            }
        }
        Counts {
            grams,
            words: words.len(),
        }
    }

    /// The number of n-grams of each order (`max(0, len - n + 1)`).
    fn guesses(&self) -> [usize; N] {
        std::array::from_fn(|k| self.words.saturating_sub(k))
    }

    /// pycocoevalcap CIDEr's "length": the count of bigrams.
    fn bigrams(&self) -> usize {
        self.words.saturating_sub(1)
    }
}

/// Checks the two lists agree and every image has a reference.
fn check<S: AsRef<str>>(references: &[Vec<S>], candidates: &[S]) -> Result<()> {
    if references.len() != candidates.len() {
        return Err(Error::invalid(format!(
            "references has {} images but candidates has {} captions: pass one list of reference captions \
             per candidate caption",
            references.len(),
            candidates.len()
        )));
    }
    if candidates.is_empty() {
        return Err(Error::invalid(
            "nothing to score: candidates and references are empty",
        ));
    }
    if let Some(i) = references.iter().position(|r| r.is_empty()) {
        return Err(Error::invalid(format!(
            "references[{i}] is empty: every image needs at least one reference caption"
        )));
    }
    Ok(())
}

/// pycocoevalcap's BLEU-1..4, ROUGE-L and CIDEr-D of `candidates` (one caption per image) against
/// `references` (the image's reference captions), on text scored as given (words split on white space; see
/// `ptb_tokenize` for raw text). See the module's documentation for the definitions.
pub fn caption_scores<S: AsRef<str> + Sync>(
    references: &[Vec<S>],
    candidates: &[S],
) -> Result<CaptionScores> {
    check(references, candidates)?;
    let images = candidates.len();

    // Words to ids (one table: BLEU/CIDEr words and ROUGE's space-split words share it).
    let mut table = Interner::new();
    let mut cand_words = Vec::with_capacity(images);
    let mut cand_space = Vec::with_capacity(images);
    let mut ref_words = Vec::with_capacity(images);
    let mut ref_space = Vec::with_capacity(images);
    for (c, rs) in candidates.iter().zip(references) {
        cand_words.push(table.words(c.as_ref()));
        cand_space.push(table.space_words(c.as_ref()));
        ref_words.push(rs.iter().map(|r| table.words(r.as_ref())).collect::<Vec<_>>());
        ref_space.push(
            rs.iter()
                .map(|r| table.space_words(r.as_ref()))
                .collect::<Vec<_>>(),
        );
    }

    let cand_counts: Vec<Counts> = cand_words.par_iter().map(|w| Counts::of(w)).collect();
    let ref_counts: Vec<Vec<Counts>> = ref_words
        .par_iter()
        .map(|rs| rs.iter().map(|w| Counts::of(w)).collect())
        .collect();

    let bleu = bleu(&cand_counts, &ref_counts);
    let rouge_scores: Vec<f64> = cand_space
        .par_iter()
        .zip(&ref_space)
        .map(|(c, rs)| rouge_l(c, rs))
        .collect();
    let cider_scores = cider(&cand_counts, &ref_counts);
    Ok(CaptionScores {
        bleu,
        rouge_l: mean(&rouge_scores),
        cider: mean(&cider_scores),
    })
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// pycocoevalcap's `BleuScorer.compute_score(option="closest")`, the corpus scores.
fn bleu(cands: &[Counts], refs: &[Vec<Counts>]) -> [f64; N] {
    const SMALL: f64 = 1e-9;
    const TINY: f64 = 1e-15;
    let per_image: Vec<([usize; N], [usize; N], usize, usize)> = cands
        .par_iter()
        .zip(refs)
        .map(|(c, rs)| {
            // The most times any one reference holds each n-gram.
            let mut most: Vec<(Gram, u32)> = rs.iter().flat_map(|r| r.grams.iter().copied()).collect();
            most.sort_unstable();
            most.dedup_by(|next, kept| {
                // `dedup_by` keeps the first of a run (the smallest count after the sort): keep the largest.
                if next.0 == kept.0 {
                    kept.1 = kept.1.max(next.1);
                    true
                } else {
                    false
                }
            });
            let mut correct = [0usize; N];
            let mut j = 0;
            for &(g, n) in &c.grams {
                while j < most.len() && most[j].0 < g {
                    j += 1;
                }
                if j < most.len() && most[j].0 == g {
                    correct[gram_order(g) - 1] += n.min(most[j].1) as usize;
                }
            }
            let testlen = c.words;
            let reflen = rs
                .iter()
                .map(|r| (r.words.abs_diff(testlen), r.words))
                .min()
                .map_or(0, |(_, l)| l);
            (correct, c.guesses(), testlen, reflen)
        })
        .collect();
    let mut correct = [0usize; N];
    let mut guess = [0usize; N];
    let (mut testlen, mut reflen) = (0usize, 0usize);
    for (c, g, t, r) in per_image {
        for k in 0..N {
            correct[k] += c[k];
            guess[k] += g[k];
        }
        testlen += t;
        reflen += r;
    }
    let mut scores = [0.0; N];
    let mut product = 1.0f64;
    for k in 0..N {
        product *= (correct[k] as f64 + TINY) / (guess[k] as f64 + SMALL);
        scores[k] = product.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (testlen as f64 + TINY) / (reflen as f64 + SMALL);
    if ratio < 1.0 {
        for s in &mut scores {
            *s *= (1.0 - 1.0 / ratio).exp();
        }
    }
    scores
}

/// The length of the longest common subsequence of two word lists.
fn lcs(a: &[u32], b: &[u32]) -> usize {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let mut row = vec![0usize; short.len() + 1];
    for &x in long {
        let mut diagonal = 0;
        for (j, &y) in short.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { above.max(row[j]) };
            diagonal = above;
        }
    }
    row[short.len()]
}

/// pycocoevalcap's `Rouge.calc_score` for one image.
fn rouge_l(cand: &[u32], refs: &[Vec<u32>]) -> f64 {
    let (mut prec, mut rec) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for r in refs {
        let l = lcs(r, cand) as f64;
        prec = prec.max(l / cand.len() as f64);
        rec = rec.max(l / r.len() as f64);
    }
    if prec != 0.0 && rec != 0.0 {
        let b2 = BETA.powi(2);
        ((1.0 + b2) * prec * rec) / (rec + b2 * prec)
    } else {
        0.0
    }
}

/// A caption as CIDEr's tf-idf vectors (sorted by n-gram), their norms per order, and its bigram count.
struct TfIdf {
    vec: Vec<(Gram, f64)>,
    norm: [f64; N],
    length: usize,
}

/// pycocoevalcap's `CiderScorer.compute_cider`: each image's score.
fn cider(cands: &[Counts], refs: &[Vec<Counts>]) -> Vec<f64> {
    // Document frequency: in how many images' reference sets each n-gram occurs.
    let mut df: FxMap<Gram, u32> = FxMap::default();
    let mut seen: Vec<Gram> = Vec::new();
    for rs in refs {
        seen.clear();
        seen.extend(rs.iter().flat_map(|r| r.grams.iter().map(|&(g, _)| g)));
        seen.sort_unstable();
        seen.dedup();
        for &g in &seen {
            *df.entry(g).or_insert(0) += 1;
        }
    }
    let ref_len = (refs.len() as f64).ln();
    let tfidf = |c: &Counts| -> TfIdf {
        let mut norm = [0.0f64; N];
        let vec = c
            .grams
            .iter()
            .map(|&(g, tf)| {
                let d = f64::from(df.get(&g).copied().unwrap_or(0)).max(1.0).ln();
                let v = f64::from(tf) * (ref_len - d);
                norm[gram_order(g) - 1] += v * v;
                (g, v)
            })
            .collect();
        TfIdf {
            vec,
            norm: norm.map(f64::sqrt),
            length: c.bigrams(),
        }
    };
    let penalty_width = 2.0 * SIGMA.powi(2);
    cands
        .par_iter()
        .zip(refs)
        .map(|(c, rs)| {
            let hyp = tfidf(c);
            let mut score = [0.0f64; N];
            for r in rs {
                let rv = tfidf(r);
                let mut val = [0.0f64; N];
                let mut j = 0;
                for &(g, h) in &hyp.vec {
                    while j < rv.vec.len() && rv.vec[j].0 < g {
                        j += 1;
                    }
                    if j < rv.vec.len() && rv.vec[j].0 == g {
                        let r = rv.vec[j].1;
                        val[gram_order(g) - 1] += h.min(r) * r;
                    }
                }
                let delta = hyp.length as f64 - rv.length as f64;
                let penalty = std::f64::consts::E.powf(-(delta * delta) / penalty_width);
                for k in 0..N {
                    if hyp.norm[k] != 0.0 && rv.norm[k] != 0.0 {
                        val[k] /= hyp.norm[k] * rv.norm[k];
                    }
                    score[k] += val[k] * penalty;
                }
            }
            score.iter().sum::<f64>() / N as f64 / rs.len() as f64 * 10.0
        })
        .collect()
}

/// The punctuation tokens pycocoevalcap's `PTBTokenizer` drops after tokenising (its `PUNCTUATIONS`).
const PTB_DROPPED: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
];

/// The English clitics the PTB tokenizer splits off a word (`dog's` -> `dog 's`), after the apostrophe.
const CLITICS: [&str; 6] = ["s", "m", "d", "re", "ve", "ll"];

/// What pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP 3.4.1, `-lowerCase -preserveLines`, then its
/// punctuation removal) does to a caption, in the parts that matter for captions, without Java: the words,
/// lower-cased, joined by single spaces.
///
/// - Lower-case; line breaks are spaces.
/// - Words are runs of letters and digits; a hyphen between two of them stays in the word
///   (`black-and-white`), and so do `.` and `,` between two digits (`3.5`, `1,000`).
/// - Clitics are split off as PTB does and kept: `don't` -> `do n't`, `dog's` -> `dog 's`, also `'m 'd 're
///   've 'll`; curly apostrophes count as `'`.
/// - Dropped, as pycocoevalcap drops them: `. , ? ! : ; - -- ...`, quotes of any kind (`"` `'` `` ` `` and
///   the curly ones, which PTB turns into `` `` `` / `''`), and parentheses/braces (PTB's `-LRB-` etc.);
///   square brackets are dropped too (PTB writes `-LSB-`, which pycocoevalcap keeps: a known difference,
///   rare in captions).
/// - Any other symbol (`& $ % # / + = @ * ~` ...) is a word of its own, kept.
///
/// Not reproduced: PTB's abbreviation rules (`u.s.` stays one word there, becomes `u s` here), URLs, emails
/// and emoticons.
pub fn ptb_tokenize(text: &str) -> String {
    let lowered: Vec<char> = text.to_lowercase().chars().map(normalise_quote).collect();
    let mut out: Vec<String> = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if !word.is_empty() {
            out.push(std::mem::take(word));
        }
    };
    let is_word = |c: Option<&char>| c.is_some_and(|c| c.is_alphanumeric());
    let is_digit = |c: Option<&char>| c.is_some_and(|c| c.is_ascii_digit());
    let mut i = 0;
    while i < lowered.len() {
        let c = lowered[i];
        let prev = if i > 0 { lowered.get(i - 1) } else { None };
        let next = lowered.get(i + 1);
        // Hyphens between letters or digits, and `.`/`,` between digits, stay inside the word.
        let joins = !word.is_empty()
            && ((c == '-' && is_word(prev) && is_word(next))
                || ((c == '.' || c == ',') && is_digit(prev) && is_digit(next)));
        if c.is_alphanumeric() || joins {
            word.push(c);
        } else if is_python_space(c) {
            flush(&mut word, &mut out);
        } else if c == '\'' {
            // n't: the word's final n goes with it (`don't` -> `do n't`).
            let rest: String = lowered[i + 1..]
                .iter()
                .take_while(|c| c.is_alphanumeric())
                .collect();
            if rest == "t" && word.ends_with('n') {
                word.pop();
                flush(&mut word, &mut out);
                out.push("n't".to_string());
                i += 2;
                continue;
            }
            flush(&mut word, &mut out);
            if CLITICS.contains(&rest.as_str()) {
                out.push(format!("'{rest}"));
                i += 1 + rest.chars().count();
                continue;
            }
            // Any other apostrophe is a quote: dropped.
        } else {
            flush(&mut word, &mut out);
            if !is_dropped(c) {
                out.push(c.to_string());
            }
        }
        i += 1;
    }
    flush(&mut word, &mut out);
    out.retain(|w| !PTB_DROPPED.contains(&w.as_str()));
    out.join(" ")
}

/// Curly single quotes as `'` (PTB normalises them before splitting clitics).
fn normalise_quote(c: char) -> char {
    match c {
        '\u{2018}' | '\u{2019}' | '\u{201b}' | '\u{2032}' => '\'',
        _ => c,
    }
}

/// Marks that PTB turns into one of pycocoevalcap's dropped tokens (or that we drop, see `ptb_tokenize`).
fn is_dropped(c: char) -> bool {
    matches!(
        c,
        '.' | ','
            | '?'
            | '!'
            | ':'
            | ';'
            | '-'
            | '"'
            | '`'
            | '('
            | ')'
            | '{'
            | '}'
            | '['
            | ']'
            | '\u{201c}'
            | '\u{201d}'
            | '\u{201e}'
            | '\u{2026}'
            | '\u{2013}'
            | '\u{2014}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(refs: &[&[&str]], cands: &[&str]) -> CaptionScores {
        let refs: Vec<Vec<&str>> = refs.iter().map(|r| r.to_vec()).collect();
        caption_scores(&refs, cands).unwrap()
    }

    #[test]
    fn identical_captions() {
        let s = scores(&[&["a b c d e"], &["f g h i j"]], &["a b c d e", "f g h i j"]);
        for b in s.bleu {
            assert!((b - 1.0).abs() < 1e-9, "{b}");
        }
        assert!((s.rouge_l - 1.0).abs() < 1e-12);
        // Two images, each n-gram in one of them: idf ln 2, the cosine 1 for every order: 10 per image.
        assert!((s.cider - 10.0).abs() < 1e-9, "{}", s.cider);
    }

    #[test]
    fn bleu_without_matches_is_tiny_not_zero() {
        let s = scores(&[&["a b c d e"]], &["v w x y z"]);
        assert!(s.bleu[0] > 0.0 && s.bleu[0] < 1e-14);
        assert_eq!(s.rouge_l, 0.0);
    }

    #[test]
    fn lcs_lengths() {
        assert_eq!(lcs(&[1, 2, 3, 4], &[2, 4]), 2);
        assert_eq!(lcs(&[1, 2, 3], &[3, 2, 1]), 1);
        assert_eq!(lcs(&[], &[1]), 0);
    }

    #[test]
    fn bad_input() {
        let refs: Vec<Vec<&str>> = vec![vec![]];
        assert!(caption_scores(&refs, &["a"])
            .unwrap_err()
            .to_string()
            .contains("references[0]"));
        assert!(caption_scores::<&str>(&[], &[]).is_err());
        assert!(caption_scores(&[vec!["a"]], &["a", "b"]).is_err());
    }

    #[test]
    fn ptb() {
        assert_eq!(ptb_tokenize("A man riding a horse."), "a man riding a horse");
        assert_eq!(
            ptb_tokenize("Don't touch the dog's ball!"),
            "do n't touch the dog 's ball"
        );
        assert_eq!(
            ptb_tokenize("A black-and-white photo, (old) \"cat\"..."),
            "a black-and-white photo old cat"
        );
        assert_eq!(
            ptb_tokenize("3.5 ft & 1,000 cats - they're here"),
            "3.5 ft & 1,000 cats they 're here"
        );
        assert_eq!(
            ptb_tokenize("The dogs' toys\nare red;  blue"),
            "the dogs toys are red blue"
        );
        assert_eq!(ptb_tokenize("It\u{2019}s \u{201c}fine\u{201d}"), "it 's fine");
        assert_eq!(ptb_tokenize("do n't 's"), "do n't 's");
        assert_eq!(ptb_tokenize(""), "");
        assert_eq!(ptb_tokenize(" .. "), "");
    }
}
