//! The connections' storage: fixed-size slots in chunks that never move,
//! addressed by a [`SlotId`]. A connection is written once into its slot
//! and updated in place; closing one moves nothing (its id moves from one
//! index to another), and a freed slot is reused before a new one is made.
//! Chunks are allocated as the table grows and kept: no reallocation copies
//! the table, and memory stays at its peak, never above `capacity` slots.

use super::connection::Connection;

/// A connection's place in the [`Slab`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotId(u32);

#[cfg(test)]
impl SlotId {
    /// A slot number for tests of the indexes, which never read the slot.
    pub(crate) fn for_test(n: u32) -> Self {
        SlotId(n)
    }
}

/// Slots per chunk: 1024 connections, about a third of a megabyte.
const CHUNK: usize = 1024;

/// Slots prefetched together before any of them is read (see
/// [`Slab::prefetch`]): enough misses in flight to fill the CPU's line
/// fill buffers (10-16), no more.
pub const PREFETCH_RUN: usize = 16;

/// Prefetches every cache line `v` spans (x86-64; elsewhere nothing).
#[inline]
fn prefetch_lines<T>(v: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        let start = v as *const T as usize;
        let end = start + size_of::<T>();
        let mut line = start & !(LINE - 1);
        while line < end {
            // SAFETY: a prefetch is a hint that never faults nor reads
            // into the program: any address is allowed, and these are all
            // within `v`'s lines.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            line += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// Where a slot's connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Free,
    /// A socket the tracepoint reports, indexed by its address.
    Live,
    /// A socket from the start-up snapshot, indexed by its 4-tuple until
    /// its first transition.
    Snapshot,
    /// Actively closed: waiting for its timewait socket, indexed by its
    /// 4-tuple.
    Timewait,
    /// Ended, in no index: waiting to be written (and freed).
    Ended,
}

/// A chunk's phases apart from its connections: a phase beside each
/// connection would cost a connection's alignment (8 bytes), not 1.
struct Chunk {
    phases: Vec<Phase>,
    conns: Vec<Connection>,
}

#[derive(Default)]
pub(super) struct Slab {
    chunks: Vec<Chunk>,
    free: Vec<SlotId>,
}

impl Slab {
    pub(super) fn insert(&mut self, phase: Phase, conn: Connection) -> SlotId {
        if let Some(id) = self.free.pop() {
            // The next insert's slot, asked for now: a freed slot has
            // usually left the caches (freed a minute ago, or in a poll's
            // thousands), and writing a connection into it stalled on
            // each of its lines.
            if let Some(&next) = self.free.last() {
                self.prefetch(next);
            }
            let (chunk, i) = Self::at(id);
            let chunk = &mut self.chunks[chunk];
            chunk.phases[i] = phase;
            chunk.conns[i] = conn;
            return id;
        }
        if self.chunks.last().is_none_or(|c| c.conns.len() == CHUNK) {
            self.chunks.push(Chunk {
                phases: Vec::with_capacity(CHUNK),
                conns: Vec::with_capacity(CHUNK),
            });
        }
        let n = self.chunks.len() - 1;
        let chunk = &mut self.chunks[n];
        chunk.phases.push(phase);
        chunk.conns.push(conn);
        SlotId((n * CHUNK + chunk.conns.len() - 1) as u32)
    }

    /// Chunk and index in it.
    fn at(id: SlotId) -> (usize, usize) {
        let i = id.0 as usize;
        (i / CHUNK, i % CHUNK)
    }

    pub(super) fn get(&self, id: SlotId) -> &Connection {
        let (chunk, i) = Self::at(id);
        &self.chunks[chunk].conns[i]
    }

    pub(super) fn get_mut(&mut self, id: SlotId) -> &mut Connection {
        let (chunk, i) = Self::at(id);
        &mut self.chunks[chunk].conns[i]
    }

    /// Asks the CPU to bring slot `id`'s connection into the cache, every
    /// line of it, without waiting for it. A slot reached through an index
    /// (a reused 4-tuple, a poll's sighting) is rarely cached: read field
    /// by field, its lines would miss one after the other; prefetched when
    /// its id is known, they arrive together, and a run of slots prefetched
    /// before any is read overlaps all their misses.
    #[inline]
    pub(super) fn prefetch(&self, id: SlotId) {
        let (chunk, i) = Self::at(id);
        if let Some(conn) = self.chunks.get(chunk).and_then(|c| c.conns.get(i)) {
            prefetch_lines(conn);
        }
    }

    pub(super) fn phase(&self, id: SlotId) -> Phase {
        let (chunk, i) = Self::at(id);
        self.chunks[chunk].phases[i]
    }

    pub(super) fn set_phase(&mut self, id: SlotId, phase: Phase) {
        let (chunk, i) = Self::at(id);
        self.chunks[chunk].phases[i] = phase;
    }

    pub(super) fn free(&mut self, id: SlotId) {
        if self.phase(id) != Phase::Free {
            self.set_phase(id, Phase::Free);
            self.free.push(id);
        }
    }

    /// Every slot in use, in slot order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (SlotId, Phase, &Connection)> {
        self.chunks
            .iter()
            .flat_map(|c| c.phases.iter().zip(&c.conns))
            .enumerate()
            .filter(|(_, (p, _))| **p != Phase::Free)
            .map(|(i, (p, c))| (SlotId(i as u32), *p, c))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (SlotId, Phase, &mut Connection)> {
        self.chunks
            .iter_mut()
            .flat_map(|c| c.phases.iter().zip(&mut c.conns))
            .enumerate()
            .filter(|(_, (p, _))| **p != Phase::Free)
            .map(|(i, (p, c))| (SlotId(i as u32), *p, c))
    }

    /// Slots allocated (in use or free), for memory accounting.
    pub(super) fn allocated(&self) -> usize {
        self.chunks.len() * CHUNK
    }
}
