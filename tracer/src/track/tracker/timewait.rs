//! The index of connections waiting for their timewait socket, by
//! namespace and 4-tuple.
//!
//! It is looked up twice per connection (a new connection may reuse a
//! waiting 4-tuple) and once per timewait socket a poll dumps, over tens of
//! thousands of entries, so it is kept small: the key is a 64-bit hash of
//! the namespace and 4-tuple (seeded per process), and the entry carries
//! what a poll needs without touching the connection (its namespace and
//! family, which polls found it, whether it is known to be in TIME_WAIT).
//! Look-ups that go on to change a connection check its 4-tuple; a poll's
//! sightings of connections already in TIME_WAIT rely on the hash alone
//! (a false match, about one look-up in 10^14 with 65,536 entries, would
//! keep another connection's entry one poll longer).
//!
//! A table that size misses the caches on every look-up, and half the
//! look-ups of new connections cannot match: a client-first churn puts
//! only clients' ephemeral ports in the index, and the servers' accepted
//! sockets are looked up by their listening port (a server-first one the
//! other way round). So the index also counts its entries per local port,
//! and [`TimewaitIndex::may_hold`] answers "no" from that count alone. It
//! reads a bit per port (8 KiB, which stays cached), not the count (256
//! KiB, which does not): a client's ephemeral port is a different one each
//! time, and its count missed the caches before the look-up that follows.

use std::{collections::hash_map::Entry, hash::BuildHasher as _};

use super::{connection::TupleKey, slab::SlotId};
use crate::{kernel::events::Family, FastMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwEntry {
    pub id: SlotId,
    pub netns: u32,
    pub family: Family,
    /// The 4-tuple's local port (see `by_lport`).
    pub lport: u16,
    /// The poll in flight (or the last one) when it began to wait: only
    /// later polls judge it.
    pub born_in: u32,
    /// The last poll that found its timewait socket.
    pub found_in: u32,
    /// A poll found it in TIME_WAIT and dated its entry: later sightings
    /// change nothing.
    pub in_time_wait: bool,
}

impl TwEntry {
    /// Poll `poll` judges this connection (it began to wait before the
    /// poll was asked) and did not find its timewait socket.
    pub fn unsighted_by(&self, poll: u32) -> bool {
        self.born_in < poll && self.found_in != poll
    }
}

#[derive(Default)]
pub(crate) struct TimewaitIndex {
    map: FastMap<u64, TwEntry>,
    /// Entries per local port, in every namespace (allocated with the
    /// first entry: 256 KiB of address space, of which only the pages of
    /// ports in use are ever touched).
    by_lport: Vec<u32>,
    /// Bit `port % 64` of word `port / 64`: `by_lport[port] > 0`.
    lport_bits: Vec<u64>,
    hasher: foldhash::fast::RandomState,
    /// Polls asked so far: the number of the one in flight.
    pub poll: u32,
}

impl TimewaitIndex {
    fn hash(&self, key: &TupleKey) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Adds connection `id` for `key`; returns the connection it displaced
    /// (one waiting on the same 4-tuple).
    pub(crate) fn insert(&mut self, key: &TupleKey, id: SlotId) -> Option<SlotId> {
        let entry = TwEntry {
            id,
            netns: key.netns,
            family: key.family,
            lport: key.lport,
            born_in: self.poll,
            found_in: 0,
            in_time_wait: false,
        };
        if self.by_lport.is_empty() {
            self.by_lport = vec![0; usize::from(u16::MAX) + 1];
            self.lport_bits = vec![0; (usize::from(u16::MAX) + 1) / 64];
        }
        self.count(key.lport, true);
        let h = self.hash(key);
        let displaced = self.map.insert(h, entry)?;
        self.count(displaced.lport, false);
        Some(displaced.id)
    }

    /// One entry more (`add`) or less on local port `lport`.
    fn count(&mut self, lport: u16, add: bool) {
        let n = &mut self.by_lport[usize::from(lport)];
        let (word, bit) = (usize::from(lport / 64), 1u64 << (lport % 64));
        if add {
            *n += 1;
            if *n == 1 {
                self.lport_bits[word] |= bit;
            }
        } else {
            *n -= 1;
            if *n == 0 {
                self.lport_bits[word] &= !bit;
            }
        }
    }

    /// False when no entry has `key`'s local port: `key` is surely not in
    /// the index, and no look-up is needed.
    pub(crate) fn may_hold(&self, key: &TupleKey) -> bool {
        self.lport_bits
            .get(usize::from(key.lport / 64))
            .is_some_and(|&w| w & (1u64 << (key.lport % 64)) != 0)
    }

    pub(crate) fn get(&self, key: &TupleKey) -> Option<&TwEntry> {
        self.map.get(&self.hash(key))
    }

    pub(crate) fn get_mut(&mut self, key: &TupleKey) -> Option<&mut TwEntry> {
        let h = self.hash(key);
        self.map.get_mut(&h)
    }

    /// Removes the entry of `key` if it is connection `id`'s.
    pub(crate) fn remove(&mut self, key: &TupleKey, id: SlotId) -> bool {
        self.remove_if(key, |e| e.id == id).is_some()
    }

    /// Removes and returns the entry of `key` if `accept` takes it: one
    /// look-up where a `get` and then a `remove` take two.
    pub(crate) fn remove_if(
        &mut self,
        key: &TupleKey,
        accept: impl FnOnce(&TwEntry) -> bool,
    ) -> Option<TwEntry> {
        match self.map.entry(self.hash(key)) {
            Entry::Occupied(e) if accept(e.get()) => {
                let (_, removed) = e.remove_entry();
                self.count(removed.lport, false);
                Some(removed)
            }
            _ => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = &TwEntry> {
        self.map.values()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.map.capacity()
    }

    /// The per-port counts' and bits' size (reserved; see `by_lport`).
    pub(crate) fn by_lport_bytes(&self) -> usize {
        self.by_lport.capacity() * size_of::<u32>() + self.lport_bits.capacity() * size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn key(lport: u16, rport: u16) -> TupleKey {
        TupleKey {
            netns: 1,
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lport,
            raddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            rport,
        }
    }

    #[test]
    fn a_local_port_without_entries_is_answered_without_a_look_up() {
        let mut index = TimewaitIndex::default();
        assert!(!index.may_hold(&key(40000, 80)), "empty index");
        assert_eq!(index.insert(&key(40000, 80), SlotId::for_test(1)), None);
        assert_eq!(index.insert(&key(40000, 81), SlotId::for_test(2)), None);
        assert!(index.may_hold(&key(40000, 82)), "same local port");
        assert!(!index.may_hold(&key(80, 40000)), "the peer's side");
        // Displacing an entry keeps its port counted once.
        assert_eq!(
            index.insert(&key(40000, 80), SlotId::for_test(3)),
            Some(SlotId::for_test(1))
        );
        assert!(
            !index.remove(&key(40000, 80), SlotId::for_test(1)),
            "not its entry"
        );
        assert!(index.remove(&key(40000, 80), SlotId::for_test(3)));
        assert!(
            index.may_hold(&key(40000, 80)),
            "40000 -> 81 is still there"
        );
        assert!(index.remove(&key(40000, 81), SlotId::for_test(2)));
        assert!(!index.may_hold(&key(40000, 81)));
        assert!(index.is_empty());
    }

    #[test]
    fn every_port_has_a_bit_of_its_own() {
        let mut index = TimewaitIndex::default();
        let ports = [0, 1, 63, 64, 127, 128, 40000, 65534, 65535];
        for (i, &p) in ports.iter().enumerate() {
            assert_eq!(index.insert(&key(p, 80), SlotId::for_test(i as u32)), None);
        }
        for p in 0..=u16::MAX {
            assert_eq!(index.may_hold(&key(p, 9)), ports.contains(&p), "port {p}");
        }
        for (i, &p) in ports.iter().enumerate() {
            assert!(index.remove(&key(p, 80), SlotId::for_test(i as u32)));
            assert!(!index.may_hold(&key(p, 80)), "port {p} emptied");
            let rest = &ports[i + 1..];
            assert!(
                rest.iter().all(|&q| index.may_hold(&key(q, 80))),
                "after {p}"
            );
        }
    }
}
