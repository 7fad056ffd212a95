//! The memory budget: the bytes every session of a configuration holds
//! (input read and not yet taken by the handler, output queued and not yet
//! written, the read buffer), summed server-wide and per client address.
//!
//! Each connection task reports what it holds at the end of a round; the
//! report is a difference, so a connection whose holdings did not change
//! (an echo that wrote everything it read) touches no shared counter.
//! Past the budget, connections stop reading: at first only those holding
//! at least [`FLOOR`] (the ones holding the most, so that small exchanges
//! go on), and every connection once the use passes the budget by an
//! eighth. A paused connection is woken when the use falls back under the
//! mark that paused it. The same two marks apply to the bytes of one
//! address against its share, a sixteenth of the budget. New sessions are
//! refused (503) while the use is over the budget or the address's share.

use std::{
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Waker},
};

/// Below this, a connection is not among "those holding the most": it may
/// read while the use is between the budget and its hard mark.
pub(crate) const FLOOR: usize = 64 * 1024;

/// One address may hold this fraction of the budget (a sixteenth).
pub(crate) const ADDRESS_SHARE: usize = 16;

/// The shared state of one budget: the configuration and its clones.
#[derive(Debug, Default)]
struct State {
    used: AtomicUsize,
    /// Paused connection tasks, woken when a mark is crossed downwards.
    waiters: Mutex<Vec<Waker>>,
    /// How many wakers `waiters` holds: read without the lock on every
    /// decrease.
    waiting: AtomicUsize,
    /// How many times `waiters` was emptied: a charge whose waker went in
    /// during the current generation need not add it again.
    generation: AtomicUsize,
}

/// A budget, shared by a configuration's clones.
#[derive(Debug, Clone, Default)]
pub(crate) struct Budget {
    state: Arc<State>,
}

/// A quarter of the memory this process may use: the machine's, or its
/// control group's limit when lower. 1 GiB where neither can be read.
pub(crate) fn default_budget() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let machine = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| meminfo_total(&text));
        let group = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|groups| cgroup_limit(&groups, |path| std::fs::read_to_string(path).ok()));
        let memory = match (machine, group) {
            (Some(machine), Some(group)) => machine.min(group),
            (Some(memory), None) | (None, Some(memory)) => memory,
            (None, None) => 4 << 30,
        };
        usize::try_from(memory / 4).unwrap_or(usize::MAX)
    })
}

/// The tightest memory limit of this process's control groups (as
/// `/proc/self/cgroup` lists them) and of their ancestors: cgroup v2's
/// `memory.max`, v1's `memory.limit_in_bytes`, read through `read`. The
/// group's own directory matters: a container's or a systemd unit's limit
/// is set there, not at the hierarchy's root.
fn cgroup_limit(groups: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    let mut limit: Option<u64> = None;
    for line in groups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (base, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = path.trim_end_matches('/').to_owned();
        loop {
            let value = read(&format!("{base}{dir}/{file}"))
                .and_then(|text| text.trim().parse::<u64>().ok());
            if let Some(value) = value {
                limit = Some(limit.map_or(value, |limit| limit.min(value)));
            }
            match dir.rfind('/') {
                Some(at) => dir.truncate(at),
                None => break,
            }
        }
    }
    limit
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What one address may hold of a budget of `limit` bytes (at least a
/// byte, so that a tiny budget still lets an idle address read).
fn address_share(limit: usize) -> usize {
    (limit / ADDRESS_SHARE).max(1)
}

/// The marks of one limit: reading stops for large holders at the first,
/// for everyone at the second.
fn marks(limit: usize) -> (usize, usize) {
    (limit, limit.saturating_add(limit / 8))
}

impl Budget {
    /// How many bytes the sessions hold now.
    pub(crate) fn used(&self) -> usize {
        self.state.used.load(Ordering::Relaxed)
    }

    /// Whether a new session from an address holding `address` bytes
    /// (when it is counted) must be refused.
    pub(crate) fn is_full(&self, limit: usize, address: Option<&AtomicUsize>) -> bool {
        self.used() >= limit
            || address.is_some_and(|bytes| bytes.load(Ordering::Relaxed) >= address_share(limit))
    }

    /// The charge of one session, against `limit`, with its address's
    /// counter when the address is known and counted.
    pub(crate) fn charge(&self, limit: usize, address: Option<Arc<AtomicUsize>>) -> Charge {
        Charge {
            state: Arc::clone(&self.state),
            address,
            limit,
            held: 0,
            registered: usize::MAX,
        }
    }
}

/// What one session holds, kept in the budget's sums; given back on drop.
#[derive(Debug)]
pub(crate) struct Charge {
    state: Arc<State>,
    address: Option<Arc<AtomicUsize>>,
    limit: usize,
    held: usize,
    /// The generation of `waiters` this charge's waker was added in
    /// (`usize::MAX`: none). A task's waker stays the task's, so one entry
    /// per generation is enough.
    registered: usize,
}

impl Charge {
    /// Records that the session now holds `bytes`.
    pub(crate) fn set(&mut self, bytes: usize) {
        if bytes == self.held {
            return;
        }
        let before = self.held;
        self.held = bytes;
        if bytes > before {
            let grow = bytes - before;
            let used = self.state.used.fetch_add(grow, Ordering::Relaxed);
            report(used, used + grow);
            if let Some(address) = &self.address {
                address.fetch_add(grow, Ordering::Relaxed);
            }
            return;
        }
        let shrink = before - bytes;
        // Sequentially consistent with `may_read`'s registration: either
        // this sees its waker, or it sees this decrease.
        let used = self.state.used.fetch_sub(shrink, Ordering::SeqCst);
        report(used, used.saturating_sub(shrink));
        let mut crossed = crosses(used, shrink, marks(self.limit));
        if let Some(address) = &self.address {
            let used = address.fetch_sub(shrink, Ordering::SeqCst);
            crossed |= crosses(used, shrink, marks(address_share(self.limit)));
        }
        if crossed && self.state.waiting.load(Ordering::SeqCst) > 0 {
            let mut guard = lock(&self.state.waiters);
            let waiters = std::mem::take(&mut *guard);
            self.state.waiting.store(0, Ordering::SeqCst);
            self.state.generation.fetch_add(1, Ordering::SeqCst);
            drop(guard);
            for waker in waiters {
                waker.wake();
            }
        }
    }

    /// Whether the session may read more now. When it may not, the task
    /// of `cx` is woken once the use falls under the mark that stopped it.
    pub(crate) fn may_read(&mut self, cx: &Context<'_>) -> bool {
        if self.allowed() {
            return true;
        }
        let mut waiters = lock(&self.state.waiters);
        let generation = self.state.generation.load(Ordering::SeqCst);
        if self.registered != generation {
            waiters.push(cx.waker().clone());
            self.state.waiting.store(waiters.len(), Ordering::SeqCst);
            self.registered = generation;
        }
        drop(waiters);
        // Looked at again once registered: a decrease between the first
        // look and the registration found no waker to wake.
        self.allowed()
    }

    /// What this session holds, as last reported.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Whether the session may read, without waiting to be woken.
    pub(crate) fn allowed(&self) -> bool {
        let large = self.held >= FLOOR;
        let fits = |used: usize, limit: usize| {
            let (soft, hard) = marks(limit);
            used < soft || (used < hard && !large)
        };
        fits(self.state.used.load(Ordering::SeqCst), self.limit)
            && self.address.as_ref().is_none_or(|address| {
                fits(address.load(Ordering::SeqCst), address_share(self.limit))
            })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Sets the gauge of the budget's use when it moves to another 64 KiB
/// step: exact enough for a dashboard, and an exchange of small messages
/// (which stays within a step) never touches the metrics registry.
fn report(before: usize, after: usize) {
    if before >> 16 != after >> 16 {
        gauge!("duplex_memory_budget_used_bytes").set(after as f64);
    }
}

/// Whether taking `shrink` from `before` brings it under one of the marks.
fn crosses(before: usize, shrink: usize, (soft, hard): (usize, usize)) -> bool {
    let after = before.saturating_sub(shrink);
    (before >= soft && after < soft) || (before >= hard && after < hard)
}

fn lock(waiters: &Mutex<Vec<Waker>>) -> std::sync::MutexGuard<'_, Vec<Waker>> {
    waiters.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::AtomicBool,
        task::{Wake, Waker},
    };

    use super::*;

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Flag>, Waker) {
        let flag = Arc::new(Flag::default());
        (Arc::clone(&flag), Waker::from(flag))
    }

    #[test]
    fn past_the_budget_the_largest_holders_stop_reading_first() {
        let budget = Budget::default();
        let limit = 1 << 20;
        let mut large = budget.charge(limit, None);
        let mut small = budget.charge(limit, None);
        let (woken, waker) = waker();
        let cx = Context::from_waker(&waker);
        large.set(limit);
        small.set(FLOOR - 1);
        assert!(!large.may_read(&cx), "over the budget, holding the most");
        assert!(small.may_read(&cx), "under the hard mark, holding little");
        small.set(limit / 8);
        assert!(!small.may_read(&cx), "past the hard mark nobody reads");
        assert!(budget.is_full(limit, None));
        large.set(0);
        assert!(woken.0.load(Ordering::SeqCst), "woken when the use falls");
        drop(small);
        assert_eq!(budget.used(), 0, "a dropped charge gives its bytes back");
        assert!(!budget.is_full(limit, None));
    }

    #[test]
    fn one_address_holds_at_most_its_share() {
        let budget = Budget::default();
        let limit = 16 << 20;
        let address = Arc::new(AtomicUsize::new(0));
        let mut first = budget.charge(limit, Some(Arc::clone(&address)));
        let mut other = budget.charge(limit, None);
        let (woken, waker) = waker();
        let cx = Context::from_waker(&waker);
        first.set(limit / ADDRESS_SHARE);
        assert!(!first.may_read(&cx), "its address used its share");
        assert!(budget.is_full(limit, Some(&address)));
        assert!(other.may_read(&cx), "another address reads on");
        assert!(!budget.is_full(limit, None));
        first.set(FLOOR);
        assert!(woken.0.load(Ordering::SeqCst));
        assert!(first.may_read(&cx));
    }

    #[test]
    fn the_limit_of_the_process_s_own_cgroup_and_its_parents_counts() {
        let files = |path: &str| -> Option<String> {
            match path {
                "/sys/fs/cgroup/memory/memory.limit_in_bytes" => {
                    Some("9223372036854771712\n".into())
                }
                "/sys/fs/cgroup/memory/box/memory.limit_in_bytes" => Some("8589934592\n".into()),
                "/sys/fs/cgroup/memory/box/job/memory.limit_in_bytes" => {
                    Some("4294967296\n".into())
                }
                "/sys/fs/cgroup/user.slice/app.service/memory.max" => Some("2147483648\n".into()),
                "/sys/fs/cgroup/user.slice/memory.max" => Some("max\n".into()),
                _ => None,
            }
        };
        assert_eq!(
            cgroup_limit("4:memory:/box/job\n3:cpu:/\n", files),
            Some(4 << 30),
            "v1: the group's own limit, under its parent's"
        );
        assert_eq!(
            cgroup_limit("0::/user.slice/app.service\n", files),
            Some(2 << 30),
            "v2: the unit's memory.max; \"max\" is no limit"
        );
        assert_eq!(cgroup_limit("0::/\n", files), None);
    }

    #[test]
    fn the_default_is_a_quarter_of_the_memory() {
        assert_eq!(
            meminfo_total("MemTotal:       24000000 kB\nMemFree: 1 kB\n"),
            Some(24_000_000 * 1024)
        );
        assert!(default_budget() >= 64 << 20, "{}", default_budget());
    }
}
