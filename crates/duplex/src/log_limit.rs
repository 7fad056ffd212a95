//! A cap on log lines that peers can cause: refused upgrades and abnormal
//! session ends are logged at `info`, so that an operator sees them, but
//! an attacker who opens thousands of bad connections a second must not
//! fill the disk. Each kind of line passes at most [`PER_SECOND`] times a
//! second; the next one that passes says how many were left out.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

/// Lines of one kind per second, process-wide.
pub(crate) const PER_SECOND: u64 = 20;

/// The budget of one kind of line.
pub(crate) struct LogLimit {
    /// The second (since [`start`]) of the current window, and how many
    /// lines it let through, packed as `second << 16 | lines`.
    window: AtomicU64,
    /// Lines left out since the last one let through.
    skipped: AtomicU64,
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl LogLimit {
    pub(crate) const fn new() -> LogLimit {
        LogLimit {
            window: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now; if so, how many were left out
    /// before it.
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(start().elapsed().as_secs() + 1)
    }

    fn admit_at(&self, second: u64) -> Option<u64> {
        let mut window = self.window.load(Ordering::Relaxed);
        loop {
            let (current, lines) = (window >> 16, window & 0xffff);
            let next = if current == second {
                if lines >= PER_SECOND {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                window + 1
            } else {
                second << 16 | 1
            };
            match self.window.compare_exchange_weak(
                window,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.skipped.swap(0, Ordering::Relaxed)),
                Err(actual) => window = actual,
            }
        }
    }
}

/// Refused upgrades.
pub(crate) static REFUSALS: LogLimit = LogLimit::new();
/// Sessions that ended other than normally.
pub(crate) static ABNORMAL_ENDS: LogLimit = LogLimit::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_per_second_lines_pass_and_the_next_says_how_many_did_not() {
        let limit = LogLimit::new();
        let passed = (0..100).filter_map(|_| limit.admit_at(7)).count();
        assert_eq!(passed as u64, PER_SECOND);
        assert_eq!(limit.admit_at(8), Some(100 - PER_SECOND));
        assert_eq!(limit.admit_at(8), Some(0));
    }
}
