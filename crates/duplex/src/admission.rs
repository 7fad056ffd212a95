//! Who may open a session: the server-wide and per-address session limits
//! and the per-address handshake rate, checked before the 101.
//!
//! One table per configuration (shared by its clones) counts the live
//! sessions of each peer address and keeps a token bucket of handshakes.
//! A [`Slot`] is the admission of one session: dropping it, when the
//! session's task ends, gives the place back.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::handshake::Rejection;

/// The limits, as configured on [`WebSockets`](crate::WebSockets).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_sessions: usize,
    pub(crate) max_sessions_per_ip: Option<usize>,
    /// Handshakes per second and burst, per address.
    pub(crate) handshake_rate: Option<(f64, f64)>,
    /// The IPv6 prefix length under which addresses count as one.
    pub(crate) ipv6_prefix: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 10_000,
            max_sessions_per_ip: Some(1_000),
            handshake_rate: Some((50.0, 1_000.0)),
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
    }
}

/// The default IPv6 prefix length of one client "address": a /64 is the
/// smallest prefix routed to one network, whose hosts choose the other 64
/// bits, so counting every address of it apart would give one host 2^64
/// addresses. Sites often get a /56 or a /48 (RFC 6177): a shorter prefix
/// groups those.
pub(crate) const DEFAULT_IPV6_PREFIX: u8 = 64;

/// The key under which the per-address limits count `ip`: an IPv4 address
/// (an IPv4-mapped IPv6 one included) as it is, an IPv6 address with every
/// bit past `ipv6_prefix` cleared.
pub(crate) fn address_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6);
                let prefix = u32::from(ipv6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
        },
    }
}

/// Addresses with no live session whose bucket is full again carry no
/// state worth keeping; they are swept when the table passes this size.
const SWEEP_AT: usize = 4_096;

/// Past this many addresses, even partly spent buckets of addresses with
/// no live session are forgotten: the table stays bounded by the live
/// sessions plus this, whatever the number of addresses a peer uses.
const MAX_IDLE_ADDRESSES: usize = 65_536;

#[derive(Debug)]
struct Peer {
    sessions: usize,
    tokens: f64,
    refilled: Instant,
    /// The bytes this address's sessions hold, for the memory budget.
    bytes: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Table {
    peers: HashMap<IpAddr, Peer>,
    sweep_at: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Sessions admitted and not yet ended, whatever their address.
    sessions: AtomicUsize,
    table: Mutex<Table>,
}

/// The shared admission state of one configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct Admission {
    state: Arc<State>,
}

/// A session's place in the counts, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    state: Arc<State>,
    /// Counted per address too.
    ip: Option<IpAddr>,
    /// What the sessions of that address hold, for the memory budget.
    address_bytes: Option<Arc<AtomicUsize>>,
}

impl Slot {
    /// The counter of the bytes held by sessions of this session's
    /// address, when the address is counted.
    pub(crate) fn address_bytes(&self) -> Option<&Arc<AtomicUsize>> {
        self.address_bytes.as_ref()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.sessions.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut table = lock(&self.state.table);
            if let Some(peer) = table.peers.get_mut(&ip) {
                peer.sessions = peer.sessions.saturating_sub(1);
            }
        }
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Admission {
    /// Admits one more session from `ip` (unknown without `ConnectInfo`),
    /// or says which limit refuses it.
    pub(crate) fn admit(
        &self,
        limits: &Limits,
        ip: Option<IpAddr>,
        now: Instant,
    ) -> Result<Slot, Rejection> {
        // Counted first, so that concurrent handshakes cannot all pass.
        let before = self.state.sessions.fetch_add(1, Ordering::AcqRel);
        let mut slot = Slot {
            state: Arc::clone(&self.state),
            ip: None,
            address_bytes: None,
        };
        if before >= limits.max_sessions {
            return Err(Rejection::ServerFull);
        }
        match ip.map(|ip| address_key(ip, limits.ipv6_prefix)) {
            Some(ip) if limits.max_sessions_per_ip.is_some() || limits.handshake_rate.is_some() => {
                slot.address_bytes = Some(self.admit_from(limits, ip, now)?);
                slot.ip = Some(ip);
                Ok(slot)
            }
            _ => Ok(slot),
        }
    }

    /// The per-address checks; counts the session on `ip` when it passes,
    /// and gives the counter of the bytes its address holds.
    fn admit_from(
        &self,
        limits: &Limits,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Arc<AtomicUsize>, Rejection> {
        let mut table = lock(&self.state.table);
        if table.peers.len() >= table.sweep_at.max(SWEEP_AT) {
            table.sweep(limits, now);
        }
        let (rate, burst) = limits.handshake_rate.unwrap_or((0.0, 0.0));
        let peer = table.peers.entry(ip).or_insert(Peer {
            sessions: 0,
            tokens: burst,
            refilled: now,
            bytes: Arc::default(),
        });
        if limits
            .max_sessions_per_ip
            .is_some_and(|max| peer.sessions >= max)
        {
            return Err(Rejection::TooManySessions);
        }
        if limits.handshake_rate.is_some() {
            let elapsed = now.saturating_duration_since(peer.refilled).as_secs_f64();
            peer.tokens = (peer.tokens + elapsed * rate).min(burst);
            peer.refilled = now;
            if peer.tokens < 1.0 {
                let wait =
                    Duration::from_secs_f64((1.0 - peer.tokens) / rate.max(f64::MIN_POSITIVE));
                return Err(Rejection::HandshakeRate {
                    retry_after: wait.as_secs().max(1),
                });
            }
            peer.tokens -= 1.0;
        }
        peer.sessions += 1;
        Ok(Arc::clone(&peer.bytes))
    }

    /// The counter of the bytes the sessions of `ip` hold, when the address
    /// is counted and has an entry; nothing is made.
    pub(crate) fn address_bytes(
        &self,
        limits: &Limits,
        ip: Option<IpAddr>,
    ) -> Option<Arc<AtomicUsize>> {
        let key = address_key(ip?, limits.ipv6_prefix);
        lock(&self.state.table)
            .peers
            .get(&key)
            .map(|peer| Arc::clone(&peer.bytes))
    }

    /// How many addresses the table holds.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        lock(&self.state.table).peers.len()
    }
}

impl Table {
    fn sweep(&mut self, limits: &Limits, now: Instant) {
        let (rate, burst) = limits.handshake_rate.unwrap_or((0.0, 0.0));
        self.peers.retain(|_, peer| {
            let elapsed = now.saturating_duration_since(peer.refilled).as_secs_f64();
            peer.sessions > 0 || peer.tokens + elapsed * rate < burst
        });
        if self.peers.len() >= MAX_IDLE_ADDRESSES {
            self.peers.retain(|_, peer| peer.sessions > 0);
        }
        // Sweep again when the table has grown well past what is left, not
        // on every handshake.
        let len = self.peers.len();
        self.sweep_at = (len * 2)
            .clamp(SWEEP_AT, MAX_IDLE_ADDRESSES)
            .max(len + SWEEP_AT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> Option<IpAddr> {
        Some(IpAddr::from(n.to_be_bytes()))
    }

    #[test]
    fn the_server_wide_limit_counts_live_sessions() {
        let admission = Admission::default();
        let limits = Limits {
            max_sessions: 2,
            ..Limits::default()
        };
        let now = Instant::now();
        let a = admission.admit(&limits, ip(1), now).unwrap();
        let _b = admission.admit(&limits, ip(2), now).unwrap();
        assert_eq!(
            admission.admit(&limits, ip(3), now).unwrap_err(),
            Rejection::ServerFull
        );
        drop(a);
        assert!(admission.admit(&limits, None, now).is_ok());
    }

    #[test]
    fn an_address_gets_its_place_back_when_a_session_ends() {
        let admission = Admission::default();
        let limits = Limits {
            max_sessions_per_ip: Some(2),
            ..Limits::default()
        };
        let now = Instant::now();
        let a = admission.admit(&limits, ip(1), now).unwrap();
        let _b = admission.admit(&limits, ip(1), now).unwrap();
        assert_eq!(
            admission.admit(&limits, ip(1), now).unwrap_err(),
            Rejection::TooManySessions
        );
        assert!(
            admission.admit(&limits, ip(2), now).is_ok(),
            "another address"
        );
        drop(a);
        assert!(admission.admit(&limits, ip(1), now).is_ok());
    }

    #[test]
    fn handshakes_past_the_burst_wait_for_the_rate() {
        let admission = Admission::default();
        let limits = Limits {
            max_sessions_per_ip: None,
            handshake_rate: Some((10.0, 3.0)),
            ..Limits::default()
        };
        let now = Instant::now();
        let slots: Vec<_> = (0..3)
            .map(|_| admission.admit(&limits, ip(1), now).unwrap())
            .collect();
        assert!(matches!(
            admission.admit(&limits, ip(1), now),
            Err(Rejection::HandshakeRate { retry_after: 1 })
        ));
        drop(slots);
        let later = now + Duration::from_millis(100);
        assert!(admission.admit(&limits, ip(1), later).is_ok());
        assert!(admission.admit(&limits, ip(1), later).is_err());
    }

    #[test]
    fn ipv6_addresses_of_one_prefix_count_as_one_address() {
        let admission = Admission::default();
        let limits = Limits {
            max_sessions_per_ip: Some(2),
            ..Limits::default()
        };
        let now = Instant::now();
        let v6 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let _a = admission
            .admit(&limits, v6("2001:db8:1:2::1"), now)
            .unwrap();
        let _b = admission
            .admit(&limits, v6("2001:db8:1:2:ffff:ffff:ffff:ffff"), now)
            .unwrap();
        assert_eq!(
            admission
                .admit(&limits, v6("2001:db8:1:2:1234::9"), now)
                .unwrap_err(),
            Rejection::TooManySessions,
            "a third address of the same /64"
        );
        assert!(
            admission.admit(&limits, v6("2001:db8:1:3::1"), now).is_ok(),
            "the next /64 is another address"
        );
    }

    #[test]
    fn the_prefix_is_configurable_and_mapped_ipv4_is_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            address_key(ip("2001:db8:aaaa:bbbb:cccc::1"), 48),
            ip("2001:db8:aaaa::")
        );
        assert_eq!(
            address_key(ip("2001:db8::1"), 128),
            ip("2001:db8::1"),
            "a /128 keeps every address apart"
        );
        assert_eq!(address_key(ip("2001:db8::1"), 0), ip("::"));
        assert_eq!(address_key(ip("::ffff:10.1.2.3"), 64), ip("10.1.2.3"));
        assert_eq!(address_key(ip("10.1.2.3"), 64), ip("10.1.2.3"));
    }

    #[test]
    fn the_table_forgets_idle_addresses() {
        let admission = Admission::default();
        let limits = Limits::default();
        let now = Instant::now();
        for n in 0..(MAX_IDLE_ADDRESSES as u32 + 10_000) {
            drop(admission.admit(&limits, ip(n), now).unwrap());
        }
        assert!(
            admission.tracked() <= MAX_IDLE_ADDRESSES,
            "{} addresses kept",
            admission.tracked()
        );
        // A minute later every bucket is full again: those addresses go at
        // the next sweep.
        let later = now + Duration::from_secs(60);
        for n in 0..20_000 {
            drop(admission.admit(&limits, ip(1 << 30 | n), later).unwrap());
        }
        assert!(
            admission.tracked() <= 20_000,
            "{} addresses kept after their buckets refilled",
            admission.tracked()
        );
    }
}
