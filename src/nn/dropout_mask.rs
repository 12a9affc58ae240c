//! LoRA's dropout on the CPU with a counter-based mask generator. torch's CPU dropout draws a Bernoulli
//! tensor (MKL integers, then a copy to float), divides it by `1 - p` and multiplies: three passes over the
//! activations plus the draw, about a sixth of a LoRA training step on 2 cores (LoRA drops the input of every
//! adapted layer). Here one pass writes the mask, already scaled, from a hash of (seed, element index), and
//! one multiply applies it; autograd's backward of that multiply is dropout's (the gradient times the mask).
//! An input that needs no gradient (the cross-attention's image embeddings under text-only LoRA) is dropped
//! in one pass that writes `x · mask` directly, the mask never stored: the same values as the multiply.
//!
//! Distribution: each element is kept independently with probability `1 - p` (a 32-bit uniform compared with
//! `(1 - p) · 2^32`: the probability exact to 2^-32) and scaled by `1 / (1 - p)`, as torch's dropout does.
//! Determinism: the seed is drawn from torch's global generator (one draw per mask), so a layer run under
//! `tch::manual_seed(layer_seed(..))` draws the same masks again (gradient checkpointing's recomputation),
//! and the mask does not depend on the number of threads that write it.

use std::ffi::c_void;

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Below this many elements the team is not woken (one thread writes the mask).
const PARALLEL_MIN: usize = 1 << 15;

/// `x` with dropout of probability `p` (training), as `x.dropout(p, true)` computes it but with this module's
/// masks on the CPU (float32, contiguous or not); other devices and kinds use torch's dropout.
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.shallow_clone());
    }
    if x.device() != Device::Cpu || x.kind() != Kind::Float || p >= 1.0 {
        return Ok(x.f_dropout(p, true)?);
    }
    if x.requires_grad() {
        let mask = mask(&x.size(), p, draw_seed()?)?;
        return Ok(x.f_mul(&mask)?);
    }
    // Nothing to backpropagate to, so nothing needs the mask: one pass reads x and writes x · mask.
    let x = x.f_contiguous()?;
    write(&x.size(), p, draw_seed()?, Some(x.data_ptr() as *const f32))
}

/// A seed drawn from torch's global CPU generator (so `manual_seed` governs it).
fn draw_seed() -> Result<u64> {
    let words = Tensor::f_randint(1 << 31, [2], (Kind::Int64, Device::Cpu))?;
    let words = Vec::<i64>::try_from(words)?;
    Ok(((words[0] as u64) << 31) ^ (words[1] as u64))
}

/// The scaled keep mask of `shape` for dropout probability `p` (`0 < p < 1`) under `seed`: `1 / (1 - p)`
/// where kept, 0 where dropped, float32.
pub fn mask(shape: &[i64], p: f64, seed: u64) -> Result<Tensor> {
    write(shape, p, seed, None)
}

/// The scaled keep mask of `shape` under `seed`, or, given `input` (contiguous float32 of `shape`), the
/// input times that mask (`x · 0.0` where dropped, as the multiply gives).
fn write(shape: &[i64], p: f64, seed: u64, input: Option<*const f32>) -> Result<Tensor> {
    let mut out = Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?;
    let n = out.numel();
    let job = Job {
        out: out.data_ptr() as *mut f32,
        input: input.unwrap_or(std::ptr::null()),
        n,
        seed,
        threshold: keep_threshold(p),
        scale: (1.0 / (1.0 - p)) as f32,
    };
    let data = &job as *const Job as *mut c_void;
    // SAFETY: `fill_team` writes disjoint ranges of `out` (alive until the call returns, as is the input the
    // caller holds) and cannot panic.
    let ran = n >= PARALLEL_MIN && unsafe { crate::openmp::run_on_team(fill_team, data, 0) };
    if !ran {
        // SAFETY: `out` holds `n` floats.
        unsafe { fill(&job, 0, n) };
    }
    let _ = &mut out;
    Ok(out)
}

/// The 32-bit threshold under which a uniform keeps its element: round((1 - p) · 2^32), saturated.
fn keep_threshold(p: f64) -> u64 {
    ((1.0 - p) * 4_294_967_296.0).round().clamp(0.0, 4_294_967_296.0) as u64
}

struct Job {
    out: *mut f32,
    /// Null for the mask itself; else the `n` floats the mask multiplies.
    input: *const f32,
    n: usize,
    seed: u64,
    threshold: u64,
    scale: f32,
}

/// splitmix64's finaliser: a bijection of 64-bit words whose outputs pass BigCrush for counter inputs.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The two 32-bit uniforms of elements `2k` and `2k + 1`.
#[inline(always)]
fn pair(seed: u64, k: u64) -> (u64, u64) {
    let h = mix(seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    (h & 0xFFFF_FFFF, h >> 32)
}

/// Writes elements `start..end` (`start` even) of the job's mask, or of its input times the mask.
///
/// # Safety
/// `job.out` (and `job.input` unless null) must hold `job.n` floats, `end <= job.n`, and no one else may
/// write `start..end`.
unsafe fn fill(job: &Job, start: usize, end: usize) {
    let out = std::slice::from_raw_parts_mut(job.out.add(start), end - start);
    let (t, s) = (job.threshold, job.scale);
    let pick = |u: u64| if u < t { s } else { 0.0 };
    if !job.input.is_null() {
        let input = std::slice::from_raw_parts(job.input.add(start), end - start);
        let pairs = out.chunks_mut(2).zip(input.chunks(2));
        for (k, (o, x)) in ((start / 2) as u64..).zip(pairs) {
            let (a, b) = pair(job.seed, k);
            o[0] = x[0] * pick(a);
            if let (Some(o1), Some(x1)) = (o.get_mut(1), x.get(1)) {
                *o1 = *x1 * pick(b);
            }
        }
        return;
    }
    let mut chunks = out.chunks_exact_mut(2);
    let mut k = (start / 2) as u64;
    for c in &mut chunks {
        let (a, b) = pair(job.seed, k);
        c[0] = pick(a);
        c[1] = pick(b);
        k += 1;
    }
    if let [last] = chunks.into_remainder() {
        *last = pick(pair(job.seed, k).0);
    }
}

/// The team callback: this thread's share of the mask (even-aligned ranges, whole cache lines).
extern "C" fn fill_team(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `mask` keeps alive until the team returns.
    let job = unsafe { &*(data as *const Job) };
    let (index, count) = crate::openmp::thread_index_and_count();
    let per = job.n.div_ceil(count).div_ceil(16) * 16;
    let start = (index * per).min(job.n);
    let end = (start + per).min(job.n);
    if start < end {
        // SAFETY: threads get disjoint ranges of the mask, which holds `n` floats.
        unsafe { fill(job, start, end) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn masks_keep_one_minus_p_scaled_and_independent_elements() {
        let p = 0.3;
        let m = values(&mask(&[1000, 1000], p, 7).unwrap());
        let scale = (1.0 / (1.0 - p)) as f32;
        assert!(m.iter().all(|&v| v == 0.0 || v == scale));
        let kept = |v: &[f32]| v.iter().filter(|&&x| x != 0.0).count() as f64 / v.len() as f64;
        // 10^6 draws: the kept share is within 5 standard deviations (5 · 4.6e-4) of 0.7.
        assert!((kept(&m) - 0.7).abs() < 2.3e-3, "{}", kept(&m));
        // Neighbours (the two halves of one hash, and consecutive hashes) are uncorrelated.
        for lag in [1, 2, 3, 1000] {
            let both = m
                .iter()
                .zip(&m[lag..])
                .filter(|(a, b)| **a != 0.0 && **b != 0.0)
                .count() as f64
                / (m.len() - lag) as f64;
            assert!((both - 0.49).abs() < 3e-3, "lag {lag}: {both}");
        }
        // Even and odd positions alike.
        let even: Vec<f32> = m.iter().step_by(2).copied().collect();
        assert!((kept(&even) - 0.7).abs() < 3.3e-3);
    }

    #[test]
    fn masks_depend_on_the_seed_alone_not_on_threads() {
        let a = mask(&[3, 70001], 0.1, 42).unwrap();
        let b = mask(&[3, 70001], 0.1, 42).unwrap();
        assert!(a.equal(&b));
        assert!(!a.equal(&mask(&[3, 70001], 0.1, 43).unwrap()));
        // One thread writing everything gives the team's mask.
        let single = Tensor::empty([3, 70001], (Kind::Float, Device::Cpu));
        let job = Job {
            out: single.data_ptr() as *mut f32,
            input: std::ptr::null(),
            n: 3 * 70001,
            seed: 42,
            threshold: keep_threshold(0.1),
            scale: (1.0 / 0.9f64) as f32,
        };
        // SAFETY: `single` holds n floats.
        unsafe { fill(&job, 0, job.n) };
        assert!(single.equal(&a));
    }

    #[test]
    fn dropout_backpropagates_its_mask() {
        // (That a seed from `manual_seed` repeats the masks is tested where the global generator is not
        // shared with other tests: tests/train.rs and the Python suite's gradient checkpointing with dropout.)
        let x = Tensor::randn([64, 513], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y1 = dropout(&x, 0.25).unwrap();
        y1.sum(Kind::Float).backward();
        let g = x.grad();
        // d(sum y)/dx is the mask itself: 0 or 1/(1-p), and y = x · mask.
        assert!(y1.detach().allclose(&(x.detach() * &g), 0.0, 0.0, false));
        assert!(values(&g)
            .iter()
            .all(|&v| v == 0.0 || v == (1.0 / 0.75f64) as f32));
        // An input without gradient is dropped in one pass, the mask never stored: bit-equal to the
        // multiply by the mask of the same seed (odd sizes, the team's ranges and one thread alike).
        for shape in [[3i64, 70001], [5, 7]] {
            let plain = Tensor::randn(shape, (Kind::Float, Device::Cpu));
            let fused = write(&shape, 0.3, 11, Some(plain.data_ptr() as *const f32)).unwrap();
            assert!(fused.equal(&(&plain * mask(&shape, 0.3, 11).unwrap())));
        }
        let plain = Tensor::randn([8, 40], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let dropped = dropout(&plain, 0.5).unwrap();
        assert!(!dropped.requires_grad());
        let kept = dropped.ne(0.0);
        assert!(dropped
            .masked_select(&kept)
            .equal(&(plain.masked_select(&kept) * 2.0)));
        // Non-contiguous inputs and other devices/kinds are handled (torch's dropout for the latter).
        let t = Tensor::randn([8, 40], (Kind::Float, Device::Cpu)).transpose(0, 1);
        assert_eq!(dropout(&t, 0.5).unwrap().size(), [40, 8]);
        let d = Tensor::randn([8, 40], (Kind::Double, Device::Cpu));
        assert_eq!(dropout(&d, 0.5).unwrap().kind(), Kind::Double);
        assert!(dropout(&d, 0.0).unwrap().equal(&d));
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release --no-default-features --lib dropout_speed -- --ignored --nocapture`: torch's
    /// dropout against this module's, forward and backward, at LoRA's inputs of a blip-base training step.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn dropout_speed() {
        for shape in [[2i64, 577, 768], [2, 577, 3072], [8, 24, 768]] {
            let x = Tensor::randn(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
            // The best of 15 interleaved runs each (the machine may be shared).
            let once = |f: &dyn Fn() -> Tensor| {
                let start = std::time::Instant::now();
                f().sum(Kind::Float).backward();
                start.elapsed().as_secs_f64() * 1e3
            };
            let (mut sum_only, mut torch, mut ours) = (f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..15 {
                sum_only = sum_only.min(once(&|| x.shallow_clone()));
                torch = torch.min(once(&|| x.dropout(0.05, true)));
                ours = ours.min(once(&|| dropout(&x, 0.05).unwrap()));
            }
            eprintln!(
                "{shape:?}: torch's dropout {:.2} ms, ours {:.2} ms (forward + backward, beyond a sum's {sum_only:.2} ms)",
                torch - sum_only,
                ours - sum_only
            );
            // An input without gradient (the cross-attention's image embeddings): the forward alone.
            let plain = x.detach();
            let forward = |f: &dyn Fn() -> Tensor| {
                let start = std::time::Instant::now();
                let _ = f();
                start.elapsed().as_secs_f64() * 1e3
            };
            let (mut masked, mut fused) = (f64::MAX, f64::MAX);
            for _ in 0..15 {
                masked = masked.min(forward(&|| &plain * mask(&shape, 0.05, 3).unwrap()));
                fused = fused.min(forward(&|| dropout(&plain, 0.05).unwrap()));
            }
            eprintln!("{shape:?} without gradient: mask and multiply {masked:.2} ms, one pass {fused:.2} ms");
        }
    }
}
