//! The caption metrics (`crate::metrics`) for Python: lists of strings in, the scores out, GIL released.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use rayon::prelude::*;

use super::errors::{guard, IntoPyResult};

/// pycocoevalcap's corpus scores (`Bleu_1`..`Bleu_4`, `ROUGE_L`, `CIDEr`) of `candidates` against
/// `references` (one list per candidate); with `tokenize`, each caption goes through `ptb_tokenize` first.
#[pyfunction]
#[pyo3(signature = (references, candidates, tokenize))]
pub fn caption_scores<'py>(
    py: Python<'py>,
    references: Vec<Vec<String>>,
    candidates: Vec<String>,
    tokenize: bool,
) -> PyResult<Bound<'py, PyDict>> {
    guard("caption_scores", || {
        let scores = py
            .detach(move || {
                if tokenize {
                    let refs: Vec<Vec<String>> = references
                        .par_iter()
                        .map(|rs| rs.iter().map(|r| crate::metrics::ptb_tokenize(r)).collect())
                        .collect();
                    let cands: Vec<String> = candidates
                        .par_iter()
                        .map(|c| crate::metrics::ptb_tokenize(c))
                        .collect();
                    crate::metrics::caption_scores(&refs, &cands)
                } else {
                    crate::metrics::caption_scores(&references, &candidates)
                }
            })
            .py()?;
        let out = PyDict::new(py);
        for (name, value) in scores.named() {
            out.set_item(name, value)?;
        }
        Ok(out)
    })
}

/// `crate::metrics::ptb_tokenize` over a list of captions.
#[pyfunction]
pub fn ptb_tokenize(py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<String>> {
    guard("ptb_tokenize", || {
        Ok(py.detach(move || {
            texts
                .par_iter()
                .map(|t| crate::metrics::ptb_tokenize(t))
                .collect()
        }))
    })
}
