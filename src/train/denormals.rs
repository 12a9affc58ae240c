//! Flush-to-zero while training on x86 CPUs. Gradients deep in a network can fall below float32's normal
//! range (~1.2e-38); x86 cores then take a microcode slow path on every such number, which made a CPU
//! training step of the random-weight benchmark model ~9x slower (both here and in transformers + peft).
//! Setting the FTZ/DAZ bits treats those numbers as zero, as TensorFlow and JAX do by default.
//!
//! The bits live in each thread's MXCSR register, so they are set on the calling thread and on every
//! thread of libtorch's OpenMP team (`crate::openmp`), and put back as they were when training ends.

/// FTZ (flush results to zero) and DAZ (read denormal inputs as zero).
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = 0x8000 | 0x0040;

#[cfg(target_arch = "x86_64")]
fn read_mxcsr() -> u32 {
    let mut csr: u32 = 0;
    // SAFETY: stmxcsr stores the 32-bit MXCSR register into the given memory location.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack)) };
    csr
}

#[cfg(target_arch = "x86_64")]
fn write_mxcsr(csr: u32) {
    // SAFETY: ldmxcsr loads MXCSR from memory; only the FTZ/DAZ bits are changed by our callers.
    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack)) };
}

/// The callback argument meaning "on" (non-null) or "off" (null).
#[cfg(target_arch = "x86_64")]
fn flag(on: bool) -> *mut std::ffi::c_void {
    if on {
        std::ptr::dangling_mut()
    } else {
        std::ptr::null_mut()
    }
}

#[cfg(target_arch = "x86_64")]
extern "C" fn set_on_this_thread(on: *mut std::ffi::c_void) {
    let on = !on.is_null();
    let csr = read_mxcsr();
    write_mxcsr(if on { csr | FTZ_DAZ } else { csr & !FTZ_DAZ });
}

/// Runs `set_on_this_thread` on every thread of the calling thread's OpenMP team (the one libtorch's
/// parallel kernels use), when libgomp is in the process.
#[cfg(target_arch = "x86_64")]
fn set_on_openmp_team(on: bool) {
    // SAFETY: the callback only touches the running thread's MXCSR and never reads its argument's target.
    unsafe { crate::openmp::run_on_team(set_on_this_thread, flag(on), 0) };
}

/// Turns FTZ/DAZ on or off for the calling thread and libtorch's OpenMP team; returns whether it was on
/// (for the calling thread). A no-op returning false off x86-64.
pub fn set(on: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let was_on = read_mxcsr() & FTZ_DAZ == FTZ_DAZ;
        set_on_this_thread(flag(on));
        set_on_openmp_team(on);
        was_on
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = on;
        false
    }
}

/// Keeps FTZ/DAZ on while alive; puts back the previous mode when dropped.
pub struct FlushDenormals {
    was_on: bool,
}

impl FlushDenormals {
    pub fn enable() -> Self {
        Self { was_on: set(true) }
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        if !self.was_on {
            set(false);
        }
    }
}
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn sets_and_restores_the_calling_threads_mode() {
        let before = read_mxcsr() & FTZ_DAZ;
        {
            let _guard = FlushDenormals::enable();
            assert_eq!(read_mxcsr() & FTZ_DAZ, FTZ_DAZ);
            let tiny = std::hint::black_box(1e-39f32);
            assert_eq!(std::hint::black_box(tiny * 0.5), 0.0); // a denormal result is flushed
        }
        assert_eq!(read_mxcsr() & FTZ_DAZ, before);
    }
}
