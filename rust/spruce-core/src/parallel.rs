//! spruce's own rayon pool: sized by `SPRUCE_NUM_THREADS` or the machine, resizable, and safe
//! across `fork()`.
//!
//! A forked child inherits the pool's memory but not its threads; using it would hang. The
//! binding registers [`mark_forked`] as a `pthread_atfork` child handler; the next kernel in the
//! child then builds a fresh pool and never touches the inherited one.

use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

static POOL: ArcSwapOption<rayon::ThreadPool> = ArcSwapOption::const_empty();
static FORKED: AtomicBool = AtomicBool::new(false);
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Async-signal-safe: only stores an atomic flag. Call from a `pthread_atfork` child handler.
pub fn mark_forked() {
    FORKED.store(true, Ordering::SeqCst);
}

fn default_threads() -> usize {
    std::env::var("SPRUCE_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// The number of threads kernels use.
pub fn num_threads() -> usize {
    match THREADS.load(Ordering::SeqCst) {
        0 => default_threads(),
        n => n,
    }
}

/// Sets the number of threads (`0` restores the default); the pool is rebuilt on next use.
pub fn set_num_threads(n: usize) {
    THREADS.store(n, Ordering::SeqCst);
    // Dropping the old pool lets its idle threads exit once no kernel holds it.
    POOL.store(None);
}

fn pool() -> Arc<rayon::ThreadPool> {
    if FORKED.swap(false, Ordering::SeqCst) {
        // The inherited pool's threads do not exist in this process: never drop or use it.
        if let Some(old) = POOL.swap(None) {
            std::mem::forget(old);
        }
    }
    if let Some(p) = POOL.load_full() {
        return p;
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads())
        .thread_name(|i| format!("spruce-{i}"))
        .build();
    let fresh = match built {
        Ok(p) => Arc::new(p),
        // Thread creation can fail (limits, sandboxes): a one-thread pool runs on the caller.
        Err(_) => Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .use_current_thread()
                .build()
                .unwrap_or_else(|_| unreachable_pool()),
        ),
    };
    POOL.store(Some(fresh.clone()));
    fresh
}

#[cold]
fn unreachable_pool() -> rayon::ThreadPool {
    // use_current_thread with one thread spawns nothing, so building it cannot fail for lack of
    // threads; keep trying the plain builder rather than aborting.
    loop {
        if let Ok(p) = rayon::ThreadPoolBuilder::new().num_threads(1).build() {
            return p;
        }
        std::thread::yield_now();
    }
}

/// Runs `f` inside spruce's pool (rayon parallel iterators inside `f` use it).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// A raw pointer shared between threads that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
// SAFETY: users only write disjoint indices from different threads (documented at each use).
unsafe impl<T: Send> Send for SyncPtr<T> {}
unsafe impl<T: Send> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// # Safety
    /// `i` must be in bounds of the allocation and no other thread may access element `i`
    /// concurrently.
    #[inline(always)]
    pub unsafe fn write(self, i: usize, v: T) {
        unsafe { self.0.add(i).write(v) }
    }
}

/// Whether this CPU has AVX2 and FMA, for kernels that keep a copy compiled for them.
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A kernel body that [`simd`] can compile for AVX2 and FMA. `run` must be
/// `#[inline(always)]`, so that it is compiled inside the function with those features enabled
/// (a closure would be called, not inlined, and keep the baseline instruction set).
pub(crate) trait Simd {
    type Out;
    fn run(self) -> Self::Out;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Simd>(k: K) -> K::Out {
    k.run()
}

/// Runs `k` compiled for AVX2 and FMA where the CPU has them, so its loops vectorize 8 floats
/// wide. The operations stay the same (no multiply-add is fused unless asked for), so results
/// do not depend on the CPU.
#[inline(always)]
pub(crate) fn simd<K: Simd>(k: K) -> K::Out {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the enabled features.
        return unsafe { run_avx2(k) };
    }
    k.run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn resizing_and_fork_flag_rebuild_the_pool() {
        set_num_threads(3);
        assert_eq!(install(rayon::current_num_threads), 3);
        mark_forked();
        let s: u64 = install(|| (0..1000u64).into_par_iter().sum());
        assert_eq!(s, 499500);
        set_num_threads(0);
        assert_eq!(num_threads(), default_threads());
    }
}
