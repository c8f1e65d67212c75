//! What the benchmarks need from the operating system: enough file descriptors for tens of
//! thousands of sockets, and the process's memory figures from `/proc/self/status`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Mutex, OnceLock, PoisonError};

use anyhow::{bail, Context};
use rlimit::Resource;
use serde::Serialize;

/// The open-file limit after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises `RLIMIT_NOFILE` so that `needed` descriptors fit: to the hard limit, and past it (up
/// to `fs.nr_open`) when the process may raise the hard limit too (root). Fails, before any
/// socket is opened, when `needed` still does not fit: running out of descriptors half-way
/// would show up as connection errors that look like the chat's fault.
pub fn raise_fd_limit(needed: u64) -> anyhow::Result<FdLimit> {
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).context("reading RLIMIT_NOFILE")?;
    if needed > hard {
        // Only a privileged process may raise the hard limit; the kernel caps it at nr_open.
        let ceiling = nr_open().unwrap_or(hard);
        let target = needed.min(ceiling).max(hard);
        if rlimit::setrlimit(Resource::NOFILE, target, target).is_ok() {
            return check(needed);
        }
    }
    if soft < hard {
        rlimit::setrlimit(Resource::NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    }
    check(needed)
}

fn check(needed: u64) -> anyhow::Result<FdLimit> {
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft < needed {
        bail!(
            "this run needs about {needed} file descriptors but RLIMIT_NOFILE is {soft} (hard {hard}); \
             run with fewer clients, or as a user allowed to raise the hard limit"
        );
    }
    Ok(FdLimit { soft, hard })
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The process's memory figures, in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// Peak resident set size (VmHWM).
    pub peak_kib: u64,
    /// Current resident set size (VmRSS).
    pub rss_kib: u64,
}

/// Reads VmHWM and VmRSS of this process (zeros where /proc is not Linux's).
///
/// The file stays open from the first call on: a run that uses up its descriptors (the naive
/// baseline does, by design) must still be able to read its memory figures afterwards.
pub fn memory() -> Memory {
    static STATUS: OnceLock<Mutex<Option<File>>> = OnceLock::new();
    let status = STATUS.get_or_init(|| Mutex::new(File::open("/proc/self/status").ok()));
    let mut file = status.lock().unwrap_or_else(PoisonError::into_inner);
    let mut text = String::new();
    // procfs regenerates the file on a read from offset 0.
    let read = match file.as_mut() {
        Some(f) => f
            .seek(SeekFrom::Start(0))
            .and_then(|_| f.read_to_string(&mut text)),
        None => return Memory::default(),
    };
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read /proc/self/status");
        return Memory::default();
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        peak_kib: field("VmHWM:"),
        rss_kib: field("VmRSS:"),
    }
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/self/clear_refs`), so the
/// next reading is the peak of what runs from now on. Returns whether the kernel took it.
pub fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// jemalloc, as in the Lambda functions and chat-local (the stack runs in this process), except
/// in a `heap-stats` build, whose counting wrapper goes over the system allocator, and in a
/// `system-alloc` build, which runs on the system allocator (glibc's malloc) to compare.
#[cfg(not(any(feature = "heap-stats", feature = "system-alloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// With the `heap-stats` feature every allocation of the process is counted, so a report can
/// tell what the code holds (live bytes) apart from what the allocator keeps resident (RSS).
#[cfg(feature = "heap-stats")]
#[global_allocator]
static HEAP: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

/// Bytes the process has requested and not freed, now and at most since [`reset_heap_peak`].
#[derive(Debug, Clone, Copy)]
pub struct Heap {
    pub live_bytes: u64,
    pub peak_bytes: u64,
}

/// The live heap, or `None` when built without the `heap-stats` feature.
pub fn heap() -> Option<Heap> {
    #[cfg(feature = "heap-stats")]
    {
        Some(Heap {
            live_bytes: HEAP.current_usage() as u64,
            peak_bytes: HEAP.peak_usage() as u64,
        })
    }
    #[cfg(not(feature = "heap-stats"))]
    None
}

/// Makes the live heap's peak its current size (a no-op without `heap-stats`).
pub fn reset_heap_peak() {
    #[cfg(feature = "heap-stats")]
    HEAP.reset_peak_usage();
}

/// A KiB figure as MiB, for people.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the machine, so receipt
/// times taken by the client agents compare with send times taken here.
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

/// CPU time this process has used, user and system, over all its threads (ns).
pub fn cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}
