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

use std::{collections::hash_map::Entry, hash::BuildHasher as _};

use super::{connection::TupleKey, slab::SlotId};
use crate::{kernel::events::Family, FastMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwEntry {
    pub id: SlotId,
    pub netns: u32,
    pub family: Family,
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
            born_in: self.poll,
            found_in: 0,
            in_time_wait: false,
        };
        let h = self.hash(key);
        self.map.insert(h, entry).map(|e| e.id)
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
        match self.map.entry(self.hash(key)) {
            Entry::Occupied(e) if e.get().id == id => {
                e.remove();
                true
            }
            _ => false,
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
}
