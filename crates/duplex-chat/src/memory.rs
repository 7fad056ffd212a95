//! Giving freed memory back to the system after many sessions end.
//!
//! glibc's allocator keeps what a burst of sessions freed: measured with
//! 1,428 sessions whose peers read nothing, the server stayed 11-16 MiB
//! above its baseline after every one of them had ended, and `malloc_trim`
//! brought it back to within 1 MiB. Trimming walks the allocator's free
//! lists under its locks, so it runs only after the number of sessions has
//! fallen, and at most once every five seconds.

use std::time::Duration;

use duplex::WebSockets;

/// How often the number of sessions is looked at.
const CHECK: Duration = Duration::from_secs(5);

/// How far the number of sessions must have fallen since the last trim
/// (or reached zero) for another.
const FALL: usize = 64;

/// Trims whenever the sessions of `websockets` have fallen by 64 or to zero
/// since the last trim, looking every five seconds; runs until the runtime
/// stops.
pub async fn release_after_sessions_end(websockets: WebSockets) {
    let mut interval = tokio::time::interval(CHECK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut high = 0usize;
    loop {
        interval.tick().await;
        let live = websockets.live_sessions();
        high = high.max(live);
        if high > live && (high - live >= FALL || live == 0) {
            release_freed_memory();
            high = live;
        }
    }
}

/// Asks the allocator to return the free memory it holds to the system.
/// Where the allocator is not glibc's, nothing happens.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a plain integer (the bytes to leave at the
    // top of the heap) and touches only the allocator's own state, under the
    // allocator's own locks; glibc documents it as MT-Safe. No Rust value is
    // read or written through it, and memory it returns to the system is
    // memory the allocator had no live allocation in.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_memory_goes_back_to_the_system() {
        // Many small blocks, every other one kept: the freed ones sit in
        // the middle of the heap, where freeing alone cannot return them.
        let mut blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 1000]).collect();
        let kept: Vec<Vec<u8>> = blocks.iter().step_by(50).cloned().collect();
        blocks.clear();
        blocks.shrink_to_fit();
        let before = rss_kib();
        release_freed_memory();
        let after = rss_kib();
        assert!(
            after + 10 * 1024 < before,
            "RSS {before} KiB before the trim, {after} KiB after"
        );
        drop(kept);
    }
}
