//! The Python extension module `blip_peft._blip_peft`: the only code that touches pyo3. It converts
//! arguments, releases the GIL around heavy work and maps errors; the behaviour lives in the core.

mod errors;
mod handle;
mod json;
mod metrics;
mod model;
mod processor;
mod retrieval;
mod tensor;
mod train;
mod vqa;

use pyo3::prelude::*;

use errors::guard;

#[pymodule]
fn _blip_peft(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<model::PyBlipModel>()?;
    m.add_class::<vqa::PyBlipVqaModel>()?;
    m.add_class::<retrieval::PyBlipRetrievalModel>()?;
    m.add_class::<processor::PyImageProcessor>()?;
    m.add_class::<processor::PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(cuda_is_available, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_code_paths, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_bf16_support, m)?)?;
    m.add_function(wrap_pyfunction!(generation_setting_names, m)?)?;
    m.add_function(wrap_pyfunction!(write_text_atomic, m)?)?;
    m.add_function(wrap_pyfunction!(model::normalize_lora_config, m)?)?;
    m.add_function(wrap_pyfunction!(train::train_native, m)?)?;
    m.add_function(wrap_pyfunction!(train::collate_captions, m)?)?;
    m.add_function(wrap_pyfunction!(train::set_flush_denormals, m)?)?;
    m.add_class::<train::PyImageCaptionData>()?;
    m.add_function(wrap_pyfunction!(processor::augment_image, m)?)?;
    m.add_function(wrap_pyfunction!(processor::augment_plan, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::caption_scores, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::ptb_tokenize, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    errors::register(m)?;
    Ok(())
}

/// Whether the native core sees a CUDA device (libtorch_cuda linked and a GPU present).
#[pyfunction]
fn cuda_is_available() -> bool {
    tch::Cuda::is_available()
}

/// The code path each of the core's own CPU kernels takes in this process (torch's names: "avx512", "avx2",
/// "default"; "torch" where torch does the work), after the `BLIP_PEFT_CPU_CAPABILITY` cap.
#[pyfunction]
fn kernel_code_paths() -> std::collections::BTreeMap<&'static str, &'static str> {
    use crate::cpu::Capability;
    let decoding = crate::nn::few_rows::code_path().map_or("torch", Capability::name);
    let resize = crate::processor::resize::code_path().name();
    [
        ("cap", crate::cpu::cap().name()),
        ("decoding", decoding),
        ("resize", resize),
    ]
    .into()
}

/// The CPU's bfloat16 arithmetic: `avx512_bf16`, `amx_bf16` (what the CPU has) and `usable` (it has one and
/// `BLIP_PEFT_CPU_CAPABILITY` leaves the libraries at AVX-512).
#[pyfunction]
fn cpu_bf16_support() -> std::collections::BTreeMap<&'static str, bool> {
    let s = crate::cpu::bf16_support();
    [
        ("avx512_bf16", s.avx512_bf16),
        ("amx_bf16", s.amx_bf16),
        ("usable", s.usable()),
    ]
    .into()
}

/// The keyword arguments `generate` reads as decoding settings (transformers' names), in declaration order.
#[pyfunction]
fn generation_setting_names() -> Vec<&'static str> {
    crate::generate::GenerationConfig::setting_names().to_vec()
}

/// Writes `text` to `path` atomically (a temporary file, then a rename): the core's one writer.
#[pyfunction]
fn write_text_atomic(path: std::path::PathBuf, text: &str) -> PyResult<()> {
    guard("write_text_atomic", || {
        use errors::IntoPyResult;
        crate::weights::write_atomic(&path, text.as_bytes()).py()
    })
}

/// A hidden test hook: panics on purpose, so the tests can check that a Rust panic reaches Python as a
/// `BlipPeftInternalError` saying it is a bug. `place`: "here" (with the GIL held), "detached" (with the GIL
/// released, as the heavy calls run) or "worker" (on a rayon worker thread, as the processor's batches run).
#[pyfunction]
fn _panic_for_test(py: Python<'_>, place: &str) -> PyResult<()> {
    guard("_panic_for_test", || match place {
        "here" => panic!("test panic with the GIL held"),
        "detached" => py.detach(|| panic!("test panic with the GIL released")),
        "worker" => py.detach(|| {
            rayon::join(|| (), || panic!("test panic on a worker thread"));
            Ok(())
        }),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "place must be \"here\", \"detached\" or \"worker\", got {other:?}"
        ))),
    })
}
