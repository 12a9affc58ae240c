//! `y = x Wᵀ + b` for a few rows of `x` (decoding: one new token per caption, so as many rows as captions)
//! with an AVX-512 kernel on x86-64 CPUs.
//!
//! Why: a decoding step reads every decoder weight once, so its speed is memory bandwidth. MKL, which torch
//! calls for float32 matmuls, reaches that with one row but not with a handful: with 8 rows its `[8, 768] ×
//! [768, 30524]ᵀ` LM head took 11 ms here against ~3.5 ms for streaming the weights (and 1.6-2.5× the
//! streaming time for the other decoder layers). This kernel reads each weight row once, multiplies it with
//! all rows of `x` (which stay in L1), and splits the output columns over libtorch's OpenMP threads.
//!
//! Used only while generating (inside [`Enabled`]) and without an autograd graph, for float32 CPU tensors;
//! any other case, and CPUs without AVX-512, take torch's `linear`. Summation order differs from MKL's, so
//! results agree with torch's to float32 rounding, not bit for bit: that is why the kernel is opt-in. A
//! checkpointed training step, for one, runs its layers without a graph and must get the very numbers its
//! recomputation with torch will get.

use std::ffi::c_void;

use tch::{Device, Kind, Tensor};

use super::grad_enabled;
use crate::error::Result;

/// The most rows handled here; beyond that MKL's blocked GEMM is the better tool (weights are then reused
/// enough times for its packing to pay off).
pub const MAX_ROWS: i64 = 32;

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, dense layers called on this thread may use the kernel (generation holds one).
pub struct Enabled {
    was: bool,
}

impl Enabled {
    pub fn new() -> Self {
        Self {
            was: ENABLED.with(|e| e.replace(true)),
        }
    }
}

impl Default for Enabled {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Enabled {
    fn drop(&mut self) {
        ENABLED.with(|e| e.set(self.was));
    }
}

#[cfg(target_arch = "x86_64")]
fn kernel_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && crate::openmp::available())
}

#[cfg(not(target_arch = "x86_64"))]
fn kernel_available() -> bool {
    false
}

/// Whether [`linear`] would run the kernel for these tensors: inside [`Enabled`], float32 on the CPU, a
/// contiguous `[out, in]` weight, at most [`MAX_ROWS`] rows, and no gradient to record.
pub fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    if !ENABLED.with(std::cell::Cell::get) {
        return false;
    }
    let float_cpu = |t: &Tensor| t.kind() == Kind::Float && t.device() == Device::Cpu;
    let size = x.size();
    let Some(&k) = size.last() else { return false };
    let wsize = weight.size();
    if !kernel_available()
        || !float_cpu(x)
        || !float_cpu(weight)
        || wsize.len() != 2
        || wsize[1] != k
        || k == 0
        || !weight.is_contiguous()
    {
        return false;
    }
    if let Some(b) = bias {
        if !float_cpu(b) || b.size() != [wsize[0]] || !b.is_contiguous() {
            return false;
        }
    }
    let rows = size[..size.len() - 1].iter().product::<i64>();
    if !(1..=MAX_ROWS).contains(&rows) {
        return false;
    }
    let needs_graph = x.requires_grad() || weight.requires_grad() || bias.is_some_and(Tensor::requires_grad);
    !(needs_graph && grad_enabled())
}

/// `x Wᵀ + b` by the kernel when [`applies`] says so, else `None` (the caller uses torch).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !applies(x, weight, bias) {
        return Ok(None);
    }
    // The size of the team libtorch's own parallel kernels use.
    run(x, weight, bias, tch::get_num_threads().max(1) as u32)
}

/// The kernel on `threads` threads of the OpenMP team (inputs already checked by [`applies`]).
#[allow(unused_variables)]
fn run(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, threads: u32) -> Result<Option<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut out_size = x.size();
        let last = out_size.len() - 1; // `applies` saw at least one dimension
        let k = out_size[last];
        let n = weight.size()[0];
        let x = x.f_contiguous()?;
        let rows = x.numel() as i64 / k;
        out_size[last] = n;
        let y = Tensor::f_empty(out_size.as_slice(), (Kind::Float, Device::Cpu))?;
        let job = avx512::Job {
            x: x.data_ptr() as *const f32,
            w: weight.data_ptr() as *const f32,
            b: bias.map_or(std::ptr::null(), |b| b.data_ptr() as *const f32),
            y: y.data_ptr() as *mut f32,
            m: rows as usize,
            n: n as usize,
            k: k as usize,
        };
        let data = &job as *const avx512::Job as *mut c_void;
        // SAFETY: run_team only reads the job (and the inputs it points to) and writes disjoint columns of `y`;
        // it cannot panic. The tensors outlive the call, which returns after every thread is done.
        if !unsafe { crate::openmp::run_on_team(avx512::run_team, data, threads) } {
            return Ok(None);
        }
        Ok(Some(y))
    }
    #[cfg(not(target_arch = "x86_64"))]
    Ok(None)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ffi::c_void;

    /// One product: raw pointers into contiguous float32 buffers that outlive the call.
    pub struct Job {
        pub x: *const f32, // [m, k]
        pub w: *const f32, // [n, k]
        pub b: *const f32, // [n] or null
        pub y: *mut f32,   // [m, n]
        pub m: usize,
        pub n: usize,
        pub k: usize,
    }

    /// Output columns per tile: a tile's weights (`COLUMN_TILE · k` floats) stay in L2 while every block of
    /// rows reads them, so rows beyond the first block cost no extra memory traffic.
    const COLUMN_TILE: usize = 64;
    /// How many weight rows ahead of the ones being multiplied are prefetched.
    const PREFETCH_ROWS: usize = 4;
    /// Column ranges given to threads start on this multiple (whole cache lines of `y` per thread).
    const THREAD_ALIGN: usize = 16;

    /// The team callback: this thread's share of the output columns.
    pub extern "C" fn run_team(data: *mut c_void) {
        // SAFETY: `data` is the `Job` that `linear` keeps alive until GOMP_parallel returns.
        let job = unsafe { &*(data as *const Job) };
        let (index, count) = crate::openmp::thread_index_and_count();
        let per = job.n.div_ceil(count).div_ceil(THREAD_ALIGN) * THREAD_ALIGN;
        let start = (index * per).min(job.n);
        let end = (start + per).min(job.n);
        if start < end {
            // SAFETY: AVX-512F was detected before any job was made; the ranges of threads do not overlap.
            unsafe { columns(job, start, end) };
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn columns(job: &Job, start: usize, end: usize) {
        let mut c = start;
        while c < end {
            let tile_end = (c + COLUMN_TILE).min(end);
            let mut r = 0;
            while r < job.m {
                let rows = (job.m - r).min(8);
                match rows {
                    1 => block::<1, 4>(job, r, c, tile_end),
                    2 => block::<2, 4>(job, r, c, tile_end),
                    3 => block::<3, 4>(job, r, c, tile_end),
                    4 => block::<4, 4>(job, r, c, tile_end),
                    5 => block::<5, 2>(job, r, c, tile_end),
                    6 => block::<6, 2>(job, r, c, tile_end),
                    7 => block::<7, 2>(job, r, c, tile_end),
                    _ => block::<8, 2>(job, r, c, tile_end),
                }
                r += rows;
            }
            c = tile_end;
        }
    }

    /// Rows `r..r+MR` of `y`, columns `c..end`, `NR` columns at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const MR: usize, const NR: usize>(job: &Job, r: usize, start: usize, end: usize) {
        let mut c = start;
        while c + NR <= end {
            tile::<MR, NR>(job, r, c);
            c += NR;
        }
        while c < end {
            tile::<MR, 1>(job, r, c);
            c += 1;
        }
    }

    /// `y[r..r+MR, c..c+NR]`: MR×NR dot products of length k, 16 lanes at a time, each in its own register.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const MR: usize, const NR: usize>(job: &Job, r: usize, c: usize) {
        let k = job.k;
        let x = job.x.add(r * k);
        let w = job.w.add(c * k);
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut p = 0;
        while p + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); NR];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(w.add(j * k + p));
                // Ask for the same place in later weight rows now: memory latency hides behind this tile's FMAs.
                let ahead = w.wrapping_add((j + PREFETCH_ROWS) * k + p);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(i * k + p));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
            p += 16;
        }
        if p < k {
            // The last k % 16 elements, through masked loads (lanes past the end read as zero).
            let mask: __mmask16 = ((1u32 << (k - p)) - 1) as __mmask16;
            let mut wv = [_mm512_setzero_ps(); NR];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, w.add(j * k + p));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(i * k + p));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                let bias = if job.b.is_null() { 0.0 } else { *job.b.add(c + j) };
                *job.y.add((r + i) * job.n + c + j) = _mm512_reduce_add_ps(*a) + bias;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rows: i64, k: i64, n: i64, bias: bool) {
        check_on(rows, k, n, bias, 2);
    }

    fn check_on(rows: i64, k: i64, n: i64, bias: bool, threads: u32) {
        tch::manual_seed(rows * 1000 + k + n);
        let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu));
        let b = bias.then(|| Tensor::randn([n], (Kind::Float, Device::Cpu)));
        let _guard = tch::no_grad_guard();
        let _enabled = Enabled::new();
        let expected = x.linear(&w, b.as_ref());
        let got = if applies(&x, &w, b.as_ref()) {
            run(&x, &w, b.as_ref(), threads).unwrap()
        } else {
            None
        };
        if !kernel_available() {
            assert!(got.is_none());
            return;
        }
        let got = got.expect("the kernel applies to float32 CPU tensors with few rows");
        assert_eq!(got.size(), expected.size());
        let err = (&got - &expected).abs().max().double_value(&[]);
        let scale = expected.abs().max().double_value(&[]).max(1.0);
        assert!(
            err <= 1e-5 * scale * (k as f64).sqrt(),
            "rows {rows} k {k} n {n}: max error {err}"
        );
    }

    #[test]
    fn matches_torch_linear_for_every_row_count_and_ragged_sizes() {
        for rows in 1..=MAX_ROWS {
            check(rows, 64, 70, rows % 2 == 0);
        }
        for &(k, n) in &[(1, 1), (5, 3), (17, 33), (768, 768), (100, 257), (3072, 40)] {
            check(3, k, n, true);
            check(8, k, n, false);
        }
    }

    #[test]
    fn splits_columns_over_any_number_of_threads() {
        for threads in [1, 3, 5] {
            check_on(8, 96, 100, true, threads);
            check_on(2, 768, 7, true, threads); // fewer columns than threads
        }
    }

    #[test]
    fn leaves_graphs_large_batches_and_other_kinds_to_torch() {
        let x = Tensor::randn([4, 16], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([8, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        {
            let _guard = tch::no_grad_guard();
            assert!(!applies(&x, &w, None), "outside generation (no `Enabled`)");
        }
        let _enabled = Enabled::new();
        assert!(
            !applies(&x, &w, None),
            "a weight that needs its gradient, with grad mode on"
        );
        {
            let _guard = tch::no_grad_guard();
            assert_eq!(applies(&x, &w, None), kernel_available());
        }
        let w = w.detach();
        let big = Tensor::randn([MAX_ROWS + 1, 16], (Kind::Float, Device::Cpu));
        assert!(!applies(&big, &w, None));
        assert!(!applies(&x.to_kind(Kind::Double), &w.to_kind(Kind::Double), None));
        assert!(!applies(&x, &w.t_copy().tr(), None), "a non-contiguous weight");
        // A 3-D input counts its leading dimensions as rows.
        let x3 = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        assert_eq!(applies(&x3, &w, None), kernel_available());
    }
}

/// Kernel against torch's `linear` on decoder shapes, weights cycled so they come from memory as in a real
/// decoding step (one warm pass, one timed):
/// `make bench-kernel`, i.e. `cargo test --release --no-default-features few_rows_speed -- --ignored --nocapture`.
#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "a measurement, not a check"]
    fn few_rows_speed() {
        let _guard = tch::no_grad_guard();
        let _enabled = Enabled::new();
        let shapes = [(768, 768, 72), (768, 3072, 24), (3072, 768, 24), (768, 30524, 4)];
        for rows in [1i64, 8, 24] {
            for (k, n, copies) in shapes {
                let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
                let weights: Vec<Tensor> = (0..copies)
                    .map(|_| Tensor::randn([n, k], (Kind::Float, Device::Cpu)))
                    .collect();
                let b = Tensor::randn([n], (Kind::Float, Device::Cpu));
                let micros = |f: &dyn Fn(&Tensor) -> Tensor| {
                    weights.iter().for_each(|w| drop(f(w)));
                    let start = std::time::Instant::now();
                    weights.iter().for_each(|w| drop(f(w)));
                    start.elapsed().as_secs_f64() / copies as f64 * 1e6
                };
                let torch = micros(&|w| x.linear(w, Some(&b)));
                let kernel = micros(&|w| linear(&x, w, Some(&b)).unwrap().unwrap());
                eprintln!(
                    "rows {rows:>2}, [{n}, {k}] weight: torch {torch:>6.0} us, kernel {kernel:>6.0} us"
                );
            }
        }
    }
}
