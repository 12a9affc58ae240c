//! Per-thread reusable pixel buffers.
//!
//! Each image needs a few megabyte-sized scratch buffers (decoded pixels, the resampler's intermediate
//! and output). Fresh allocations of that size come from the kernel as untouched pages, and the page
//! faults on first touch cost about as much as the resampling itself; recycling the buffers on each
//! worker thread avoids them.

use std::cell::RefCell;

/// Buffers kept per thread; one image uses at most three at a time.
const KEEP: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A zero-filled buffer of `len` bytes, recycled when possible.
pub fn take(len: usize) -> Vec<u8> {
    let recycled = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        // Prefer the smallest buffer that is already large enough.
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.or(if pool.is_empty() { None } else { Some(0) })
            .map(|i| pool.swap_remove(i))
    });
    let mut buffer = recycled.unwrap_or_default();
    buffer.clear();
    buffer.resize(len, 0);
    buffer
}

/// Hands a buffer back for reuse by later images on this thread.
pub fn give(buffer: Vec<u8>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < KEEP {
            pool.push(buffer);
        } else if let Some(smallest) = pool.iter_mut().min_by_key(|b| b.capacity()) {
            if smallest.capacity() < buffer.capacity() {
                *smallest = buffer;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_and_recycled() {
        let mut a = take(1000);
        a.fill(7);
        let ptr = a.as_ptr();
        give(a);
        let b = take(500);
        assert_eq!(b.as_ptr(), ptr);
        assert!(b.iter().all(|&v| v == 0) && b.len() == 500);
    }
}
