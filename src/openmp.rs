//! libtorch's OpenMP thread team, reached through libgomp's entry points found at run time (the ones
//! `#pragma omp parallel` compiles to). Our own CPU kernels and per-thread settings run on the same threads
//! libtorch's parallel kernels use, so they never compete with torch's (spinning) workers for the cores.

use std::ffi::c_void;
use std::sync::OnceLock;

/// A function run once on every thread of the team, with the pointer given to [`run_on_team`].
pub type TeamFn = extern "C" fn(*mut c_void);

type GompParallel = unsafe extern "C" fn(TeamFn, *mut c_void, u32, u32);
type OmpIndex = unsafe extern "C" fn() -> i32;

struct Team {
    parallel: GompParallel,
    thread_num: OmpIndex,
    num_threads: OmpIndex,
}

fn lookup(name: &std::ffi::CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_DEFAULT only looks the symbol up; null means it is not in the process.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<Team>> = OnceLock::new();
    TEAM.get_or_init(|| {
        let parallel = lookup(c"GOMP_parallel");
        let thread_num = lookup(c"omp_get_thread_num");
        let num_threads = lookup(c"omp_get_num_threads");
        if parallel.is_null() || thread_num.is_null() || num_threads.is_null() {
            return None;
        }
        // SAFETY: these are libgomp's C entry points, with these signatures in every libgomp (and in LLVM's
        // libomp, which exports the GOMP_ names for compatibility).
        unsafe {
            Some(Team {
                parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
                thread_num: std::mem::transmute::<*mut c_void, OmpIndex>(thread_num),
                num_threads: std::mem::transmute::<*mut c_void, OmpIndex>(num_threads),
            })
        }
    })
    .as_ref()
}

/// Whether libgomp is in the process (libtorch's CPU build loads it), so [`run_on_team`] runs in parallel.
pub fn available() -> bool {
    team().is_some()
}

/// Runs `f(data)` on each of `threads` threads of the calling thread's OpenMP team (0: the team's default
/// size) and returns when all are done; false (nothing run) without libgomp.
///
/// # Safety
/// `f` must not unwind, and must only use `data` in ways that are sound from several threads at once.
pub unsafe fn run_on_team(f: TeamFn, data: *mut c_void, threads: u32) -> bool {
    match team() {
        Some(team) => {
            // SAFETY: GOMP_parallel(fn, data, num_threads, flags) runs fn(data) on the team and joins it.
            (team.parallel)(f, data, threads, 0);
            true
        }
        None => false,
    }
}

/// Inside a [`run_on_team`] callback: this thread's index in the team and the team's size.
pub fn thread_index_and_count() -> (usize, usize) {
    match team() {
        // SAFETY: plain reads of the OpenMP runtime's per-thread state.
        Some(team) => unsafe {
            let index = (team.thread_num)().max(0) as usize;
            let count = (team.num_threads)().max(1) as usize;
            (index, count)
        },
        None => (0, 1),
    }
}
