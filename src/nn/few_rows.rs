//! `y = x Wᵀ + b` for a few rows of `x` (decoding: one new token per caption, so as many rows as captions)
//! with an AVX-512 (or AVX2 + FMA) kernel on x86-64 CPUs.
//!
//! Why: a decoding step reads every decoder weight once, so its speed is memory bandwidth. MKL, which torch
//! calls for float32 matmuls, reaches that with one row but not with a handful: with 8 rows its `[8, 768] ×
//! [768, 30524]ᵀ` LM head took 11 ms here against ~3.5 ms for streaming the weights (and 1.6-2.5× the
//! streaming time for the other decoder layers). This kernel reads each weight row once, multiplies it with
//! all rows of `x` (which stay in L1), and splits the output columns over libtorch's OpenMP threads.
//!
//! Used only while generating (a [`ForwardContext`](super::ForwardContext) with `decoding_kernel`, which
//! `generate` passes down) and without an autograd graph, for float32 CPU tensors; any other case, and CPUs
//! without AVX2, take torch's `linear`. Summation order differs from MKL's, so
//! results agree with torch's to float32 rounding, not bit for bit: that is why the kernel is opt-in. A
//! checkpointed training step, for one, runs its layers without a graph and must get the very numbers its
//! recomputation with torch will get.

use std::ffi::c_void;

use tch::{Device, Kind, Tensor};

use super::grad_enabled;
use crate::cpu::Capability;
use crate::error::Result;

/// The most rows handled here; beyond that MKL's blocked GEMM is the better tool (weights are then reused
/// enough times for its packing to pay off).
pub const MAX_ROWS: i64 = 32;

/// The instruction set the kernel is compiled for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    fn capability(self) -> Capability {
        match self {
            Self::Avx512 => Capability::Avx512,
            Self::Avx2 => Capability::Avx2,
        }
    }
}

/// The instruction sets this CPU runs the kernel with under the environment's cap (`crate::cpu`), best first;
/// empty without libgomp, which spreads the work.
fn supported() -> Vec<Isa> {
    let mut isas = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if crate::openmp::available() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
        }
    }
    isas.retain(|isa| crate::cpu::allows(isa.capability()));
    isas
}

/// The best instruction set this CPU runs the kernel with, if any.
fn best_isa() -> Option<Isa> {
    static BEST: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| supported().first().copied())
}

/// The code path the kernel takes in this process (`None`: torch does every decoding matmul).
pub fn code_path() -> Option<Capability> {
    best_isa().map(Isa::capability)
}

fn kernel_available() -> bool {
    best_isa().is_some()
}

/// Whether [`linear`] would run the kernel for these tensors: float32 on the CPU, a contiguous `[out, in]`
/// weight, at most [`MAX_ROWS`] rows, and no gradient to record. (Whether to ask is the caller's: see the
/// module's comment.)
pub fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
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
    match best_isa() {
        // The size of the team libtorch's own parallel kernels use.
        Some(isa) => run(x, weight, bias, tch::get_num_threads().max(1) as u32, isa),
        None => Ok(None),
    }
}

/// The kernel for `isa` (which this CPU must support) on `threads` threads of the OpenMP team (inputs already
/// checked by [`applies`]).
#[allow(unused_variables)]
fn run(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, threads: u32, isa: Isa) -> Result<Option<Tensor>> {
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
        let job = simd::Job {
            x: x.data_ptr() as *const f32,
            w: weight.data_ptr() as *const f32,
            b: bias.map_or(std::ptr::null(), |b| b.data_ptr() as *const f32),
            y: y.data_ptr() as *mut f32,
            m: rows as usize,
            n: n as usize,
            k: k as usize,
        };
        let data = &job as *const simd::Job as *mut c_void;
        let team_fn = match isa {
            Isa::Avx512 => simd::avx512::run_team,
            Isa::Avx2 => simd::avx2::run_team,
        };
        // SAFETY: run_team only reads the job (and the inputs it points to) and writes disjoint columns of `y`;
        // it cannot panic. The tensors outlive the call, which returns after every thread is done.
        if !unsafe { crate::openmp::run_on_team(team_fn, data, threads) } {
            return Ok(None);
        }
        Ok(Some(y))
    }
    #[cfg(not(target_arch = "x86_64"))]
    Ok(None)
}

#[cfg(target_arch = "x86_64")]
mod simd {
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

    /// This OpenMP thread's share of the output columns, `start..end` (possibly empty).
    fn thread_columns(n: usize) -> (usize, usize) {
        let (index, count) = crate::openmp::thread_index_and_count();
        let per = n.div_ceil(count).div_ceil(THREAD_ALIGN) * THREAD_ALIGN;
        let start = (index * per).min(n);
        (start, (start + per).min(n))
    }

    /// The kernel for one instruction set, given its vector helpers (`V`, `LANES`, `zero`, `load`, `load_tail`,
    /// `fma`, `sum`) and how many rows and columns a register tile holds for each height of a row block.
    macro_rules! kernel {
        ($feature:literal, max_rows: $max_rows:literal, tiles: { $($rows:literal => $nr:literal),+ }) => {
            /// The team callback: this thread's share of the output columns.
            pub extern "C" fn run_team(data: *mut c_void) {
                // SAFETY: `data` is the `Job` that `linear` keeps alive until GOMP_parallel returns.
                let job = unsafe { &*(data as *const Job) };
                let (start, end) = thread_columns(job.n);
                if start < end {
                    // SAFETY: the instruction set was detected before any job was made; the column ranges of
                    // threads do not overlap.
                    unsafe { columns(job, start, end) };
                }
            }

            #[target_feature(enable = $feature)]
            unsafe fn columns(job: &Job, start: usize, end: usize) {
                let mut c = start;
                while c < end {
                    let tile_end = (c + COLUMN_TILE).min(end);
                    let mut r = 0;
                    while r < job.m {
                        let rows = (job.m - r).min($max_rows);
                        match rows {
                            $($rows => block::<$rows, $nr>(job, r, c, tile_end),)+
                            _ => unreachable!("row blocks hold 1 to {} rows", $max_rows),
                        }
                        r += rows;
                    }
                    c = tile_end;
                }
            }

            /// Rows `r..r+MR` of `y`, columns `c..end`, `NR` columns at a time.
            #[target_feature(enable = $feature)]
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

            /// `y[r..r+MR, c..c+NR]`: MR×NR dot products of length k, `LANES` at a time, each in its own register.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn tile<const MR: usize, const NR: usize>(job: &Job, r: usize, c: usize) {
                let k = job.k;
                let x = job.x.add(r * k);
                let w = job.w.add(c * k);
                let mut acc = [[zero(); NR]; MR];
                let mut p = 0;
                while p + LANES <= k {
                    let mut wv = [zero(); NR];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = load(w.add(j * k + p));
                        // Ask for the same place in later weight rows now: memory latency hides behind this
                        // tile's FMAs (without it the kernel was only ~1.5x MKL).
                        let ahead = w.wrapping_add((j + PREFETCH_ROWS) * k + p);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let xv = load(x.add(i * k + p));
                        for (a, v) in row.iter_mut().zip(&wv) {
                            *a = fma(xv, *v, *a);
                        }
                    }
                    p += LANES;
                }
                if p < k {
                    // The last k % LANES elements, through masked loads (lanes past the end read as zero).
                    let mut wv = [zero(); NR];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = load_tail(w.add(j * k + p), k - p);
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let xv = load_tail(x.add(i * k + p), k - p);
                        for (a, v) in row.iter_mut().zip(&wv) {
                            *a = fma(xv, *v, *a);
                        }
                    }
                }
                for (i, row) in acc.iter().enumerate() {
                    for (j, a) in row.iter().enumerate() {
                        let bias = if job.b.is_null() { 0.0 } else { *job.b.add(c + j) };
                        *job.y.add((r + i) * job.n + c + j) = sum(*a) + bias;
                    }
                }
            }
        };
    }

    /// AVX-512F: 32 vector registers, so tiles of up to 8 rows × 2 columns (or 4 × 4).
    pub mod avx512 {
        use super::*;
        use std::arch::x86_64::*;

        type V = __m512;
        const LANES: usize = 16;

        #[target_feature(enable = "avx512f")]
        #[inline]
        fn zero() -> V {
            _mm512_setzero_ps()
        }

        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn load(p: *const f32) -> V {
            _mm512_loadu_ps(p)
        }

        /// The first `n < LANES` floats at `p`, the other lanes zero (nothing past them is read).
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn load_tail(p: *const f32, n: usize) -> V {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p)
        }

        #[target_feature(enable = "avx512f")]
        #[inline]
        fn fma(a: V, b: V, c: V) -> V {
            _mm512_fmadd_ps(a, b, c)
        }

        #[target_feature(enable = "avx512f")]
        #[inline]
        fn sum(v: V) -> f32 {
            _mm512_reduce_add_ps(v)
        }

        kernel!("avx512f", max_rows: 8, tiles: {
            1 => 4, 2 => 4, 3 => 4, 4 => 4, 5 => 2, 6 => 2, 7 => 2, 8 => 2
        });
    }

    /// AVX2 + FMA: 16 vector registers, so tiles of up to 4 rows × 3 columns (12 sums, 3 weights, 1 input).
    pub mod avx2 {
        use super::*;
        use std::arch::x86_64::*;

        type V = __m256;
        const LANES: usize = 8;

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn zero() -> V {
            _mm256_setzero_ps()
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn load(p: *const f32) -> V {
            _mm256_loadu_ps(p)
        }

        /// The first `n < LANES` floats at `p`, the other lanes zero (nothing past them is read).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn load_tail(p: *const f32, n: usize) -> V {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
            _mm256_maskload_ps(p, mask)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn fma(a: V, b: V, c: V) -> V {
            _mm256_fmadd_ps(a, b, c)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn sum(v: V) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }

        kernel!("avx2,fma", max_rows: 4, tiles: { 1 => 4, 2 => 4, 3 => 3, 4 => 3 });
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
        let expected = x.linear(&w, b.as_ref());
        assert_eq!(applies(&x, &w, b.as_ref()), kernel_available());
        // Every instruction set this CPU has, not only the one `linear` picks.
        for isa in supported() {
            let got = run(&x, &w, b.as_ref(), threads, isa).unwrap();
            let got = got.expect("libgomp is loaded with libtorch");
            assert_eq!(got.size(), expected.size());
            let err = (&got - &expected).abs().max().double_value(&[]);
            let scale = expected.abs().max().double_value(&[]).max(1.0);
            assert!(
                err <= 1e-5 * scale * (k as f64).sqrt(),
                "{isa:?}: rows {rows} k {k} n {n}: max error {err}"
            );
        }
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
                let mut line = format!("rows {rows:>2}, [{n}, {k}] weight: torch {torch:>6.0} us");
                for isa in supported() {
                    let threads = tch::get_num_threads().max(1) as u32;
                    let kernel = micros(&|w| run(&x, w, Some(&b), threads, isa).unwrap().unwrap());
                    line += &format!(", {isa:?} {kernel:>6.0} us");
                }
                eprintln!("{line}");
            }
        }
    }
}
