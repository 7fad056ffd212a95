//! How many of something one client address holds at once: HTTP
//! connections not yet upgraded (`App::max_connections_per_ip`) and TLS
//! handshakes in progress (`tls.rs`).
//!
//! Addresses are grouped as the session limits group them
//! ([`address_key`]: an IPv6 /64 counts as one client). The table keeps an
//! entry only while its address holds something, so it is bounded by what
//! is held, never by the number of addresses seen.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use crate::admission::address_key;

/// A per-address cap shared by everything that enters under it.
#[derive(Debug, Clone)]
pub(crate) struct AddressLimit {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max: usize,
    ipv6_prefix: u8,
}

/// One place taken under an [`AddressLimit`], given back on drop.
#[derive(Debug)]
pub(crate) struct AddressPlace {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl AddressLimit {
    /// At most `max` places per address (at least one).
    pub(crate) fn new(max: usize, ipv6_prefix: u8) -> Self {
        AddressLimit {
            held: Arc::default(),
            max: max.max(1),
            ipv6_prefix,
        }
    }

    /// A place for `ip`, or `None` when its address holds `max` already.
    pub(crate) fn enter(&self, ip: IpAddr) -> Option<AddressPlace> {
        let key = address_key(ip, self.ipv6_prefix);
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressPlace {
            held: Arc::clone(&self.held),
            key,
        })
    }

    /// How many addresses hold a place.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_max_and_gets_places_back() {
        let limit = AddressLimit::new(2, 64);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = limit.enter(ip).unwrap();
        let _b = limit.enter(ip).unwrap();
        assert!(limit.enter(ip).is_none());
        assert!(limit.enter("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(limit.enter(ip).is_some());
    }

    #[test]
    fn a_v6_prefix_is_one_address_and_the_table_forgets_empty_ones() {
        let limit = AddressLimit::new(1, 64);
        let place = limit.enter("2001:db8::1".parse().unwrap()).unwrap();
        assert!(limit.enter("2001:db8::2".parse().unwrap()).is_none());
        drop(place);
        assert_eq!(limit.addresses(), 0);
    }
}
