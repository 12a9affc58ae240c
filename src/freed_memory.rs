//! What glibc's malloc (Linux) does with freed memory: kept in the process while training, given back to the
//! system after a call that is done with it.
//!
//! A training step allocates and frees the same large activation buffers every step. glibc serves a block
//! over its mmap threshold (128 KiB, rising by itself to at most 32 MiB) with fresh pages from the kernel
//! and gives them back when it is freed, so every step page-faults those buffers in again and the kernel
//! zeroes each page. At blip-image-captioning-base shapes, batch 8, LoRA on both towers (2-core AMD EPYC,
//! bench/RESULTS.md): transformers + peft faulted ~14 GB a step, 14-18 s of system time in a 33 s step;
//! our step 1.3 GB, ~2 s of 20 s. With the blocks kept, both page-fault nothing after the first steps.
//!
//! While a [`KeepFreedMemory`] lives, large blocks come from the heap (`M_MMAP_MAX` = 0) and freed ones stay
//! there (`M_TRIM_THRESHOLD` = -1: never trimmed), so a step reuses the previous step's pages. When the last
//! one is dropped, the thresholds go to what glibc's own adaptation reaches in a torch process (mmap above
//! 32 MiB, trim above 64 MiB), mmap is allowed again, and the heap's free pages go back to the system
//! (`malloc_trim`). A process whose user tuned malloc (`GLIBC_TUNABLES` with `glibc.malloc.*`, or
//! `MALLOC_*_` variables) is left as it is.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::sync::Mutex;

    /// How many guards are alive, and whether the first one changed the settings.
    static STATE: Mutex<(usize, bool)> = Mutex::new((0, false));

    /// glibc's own default for `M_MMAP_MAX`, and the thresholds its dynamic adjustment ends at on 64-bit.
    const MMAP_MAX_DEFAULT: i32 = 65536;
    const MMAP_THRESHOLD_ADAPTED: i32 = 32 << 20;
    const TRIM_THRESHOLD_ADAPTED: i32 = 64 << 20;

    fn user_tuned_malloc() -> bool {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        tunables.contains("glibc.malloc.")
            || std::env::vars_os().any(|(k, _)| {
                let k = k.to_string_lossy();
                k.starts_with("MALLOC_") && k.ends_with('_')
            })
    }

    pub fn acquire() {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == 0 && !user_tuned_malloc() {
            // SAFETY: mallopt only changes malloc's parameters, under its own lock.
            state.1 = unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
            };
        }
        state.0 += 1;
    }

    pub fn release() {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 && std::mem::take(&mut state.1) {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_ADAPTED);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_ADAPTED);
                libc::mallopt(libc::M_MMAP_MAX, MMAP_MAX_DEFAULT);
            }
            trim();
        }
    }

    pub fn give_back() {
        if STATE.lock().unwrap_or_else(|e| e.into_inner()).0 == 0 {
            trim();
        }
    }

    fn trim() {
        // SAFETY: malloc_trim only returns free heap pages to the kernel, under malloc's locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Hands the heap's free pages back to the system. glibc keeps freed blocks under its mmap threshold (which
/// grows to 32 MiB) in the process, so a `generate` call's image keys/values and activations (~330 MB at
/// batch 8 on real shapes) would otherwise stay resident after it returns. Costs ~1 ms. Does nothing while
/// a [`KeepFreedMemory`] lives (an evaluation inside `train`: the next step wants those pages).
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::give_back();
}

/// Keeps freed memory in the process while alive (see the module's documentation); nests and may be held by
/// several threads at once: the settings change with the first and go back with the last.
pub struct KeepFreedMemory(());

impl KeepFreedMemory {
    pub fn enable() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        glibc::acquire();
        Self(())
    }
}

impl Drop for KeepFreedMemory {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        glibc::release();
    }
}
