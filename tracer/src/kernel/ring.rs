//! The consumer side of the kernel program's ring buffer (`EVENTS`),
//! with its data pages mapped once.
//!
//! The kernel maps a ring buffer's data pages twice in a row, so that a
//! record that wraps past the end reads as one piece; libbpf and aya map
//! them twice in userspace too, and the process's RSS then counts the ring
//! buffer twice (8 MiB of the default 4 MiB, over half of an idle agent's
//! RSS). Here they are mapped once, and a record that wraps (at most one
//! per trip around the buffer) is copied into a scratch buffer first.
//!
//! The protocol is the kernel's (`kernel/bpf/ringbuf.c`): a consumer
//! position page (the only page userspace may write), a producer position
//! page, then the data. Each record starts on an 8-byte boundary with an
//! 8-byte header whose first word is its length with two flags: busy
//! (reserved, not yet submitted) and discarded. Positions only grow; a
//! position's offset in the data is the position modulo the data size.

use std::{
    io,
    ops::Deref,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;

/// `BPF_RINGBUF_HDR_SZ`.
const HEADER: usize = 8;
/// `BPF_RINGBUF_BUSY_BIT`: reserved, not submitted yet.
const BUSY: u32 = 1 << 31;
/// `BPF_RINGBUF_DISCARD_BIT`: submitted as discarded; skipped.
const DISCARD: u32 = 1 << 30;
/// Room the scratch buffer has from the start: every record the program
/// sends is far shorter, so a wrapped record allocates nothing.
const SCRATCH: usize = 4 << 10;

/// The ring buffer, mapped, with the map that owns it.
pub struct Ring {
    reader: Reader,
    consumer: Mapping,
    producer: Mapping,
    map: MapData,
}

impl Ring {
    /// Maps the ring buffer `map`, of the size the kernel made it (its
    /// `max_entries`: a power of two, a multiple of the page size).
    pub fn new(map: MapData) -> io::Result<Self> {
        let size = map.info().map_err(io::Error::other)?.max_entries() as usize;
        if !size.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring buffer size {size} is not a power of two"),
            ));
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("no page size"))?;
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + size, libc::PROT_READ, page)?;
        // SAFETY: the consumer page's first word is the consumer position,
        // the producer page's the producer position, and the data follows
        // the producer page: all valid while the mappings are, which the
        // `Ring` owns with the reader.
        let reader = unsafe {
            Reader::new(
                consumer.ptr.cast(),
                producer.ptr.cast(),
                producer.ptr.as_ptr().add(page),
                size,
            )
        };
        Ok(Ring {
            reader,
            consumer,
            producer,
            map,
        })
    }

    /// The next record, or `None` when there is none yet (empty, or the
    /// next one is still being written). Its space goes back to the
    /// kernel when the item is dropped.
    pub fn next_record(&mut self) -> Option<Item<'_>> {
        self.reader.next_record()
    }
}

// SAFETY: the ring owns its mappings and the map; its raw pointers lead
// only into those. Reading needs `&mut Ring`; a shared one only gives the
// fd and the sizes.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

impl AsFd for Ring {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl std::os::fd::AsRawFd for Ring {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.as_fd().as_raw_fd()
    }
}

// By hand: the reader's pointers say nothing; the sizes do.
impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("size", &self.reader.size)
            .field("consumer_len", &self.consumer.len)
            .field("producer_len", &self.producer.len)
            .finish()
    }
}

/// One `mmap` of the map's fd, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: i32, len: usize, prot: i32, offset: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        // SAFETY: a new shared mapping of the map's fd; the kernel checks
        // the length, offset and protection against the ring buffer.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Reads records from a ring buffer's memory (the mappings of a [`Ring`],
/// or plain memory in the tests).
struct Reader {
    consumer: NonNull<AtomicU64>,
    producer: NonNull<AtomicU64>,
    data: *const u8,
    size: usize,
    /// The consumer position: where the next record's header is.
    pos: u64,
    /// Where a wrapped record is put together.
    scratch: Vec<u8>,
}

impl Reader {
    /// # Safety
    /// `consumer` and `producer` point to the positions, and `data` to the
    /// `size` bytes of data, of one ring buffer, valid (and only written
    /// by its producer, but for the consumer position) for the reader's
    /// whole life; `size` is a power of two.
    unsafe fn new(
        consumer: NonNull<AtomicU64>,
        producer: NonNull<AtomicU64>,
        data: *const u8,
        size: usize,
    ) -> Self {
        // SAFETY: the caller's.
        let pos = unsafe { consumer.as_ref() }.load(Ordering::Acquire);
        Reader {
            consumer,
            producer,
            data,
            size,
            pos,
            scratch: Vec::with_capacity(SCRATCH),
        }
    }

    fn next_record(&mut self) -> Option<Item<'_>> {
        // SAFETY: valid for the reader's life (see `new`).
        let (consumer, producer) = unsafe { (self.consumer.as_ref(), self.producer.as_ref()) };
        loop {
            if self.pos >= producer.load(Ordering::Acquire) {
                return None;
            }
            let mask = self.size - 1;
            let at = self.pos as usize & mask;
            // SAFETY: positions are multiples of 8 and the size of the data
            // too: the header's first word lies within the data, aligned.
            let word = unsafe { &*self.data.add(at).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if word & BUSY != 0 {
                return None;
            }
            let len = (word & !(BUSY | DISCARD)) as usize;
            let next = self.pos + (HEADER + len).next_multiple_of(8) as u64;
            // A record longer than the buffer cannot be: the kernel never
            // writes one. Skipped like a discarded one, never read.
            if word & DISCARD != 0 || len > self.size - HEADER {
                self.pos = next;
                consumer.store(next, Ordering::Release);
                continue;
            }
            let start = (at + HEADER) & mask;
            let bytes: &[u8] = if start + len <= self.size {
                // SAFETY: within the data; submitted (not busy), so the
                // producer no longer writes it until the consumer position
                // passes it.
                unsafe { std::slice::from_raw_parts(self.data.add(start), len) }
            } else {
                let first = self.size - start;
                self.scratch.clear();
                // SAFETY: as above, in two pieces: the end of the data, then
                // its start.
                unsafe {
                    self.scratch
                        .extend_from_slice(std::slice::from_raw_parts(self.data.add(start), first));
                    self.scratch
                        .extend_from_slice(std::slice::from_raw_parts(self.data, len - first));
                }
                &self.scratch
            };
            return Some(Item {
                bytes,
                consumer,
                pos: &mut self.pos,
                next,
            });
        }
    }
}

/// A record of the ring buffer; its space is given back when dropped.
pub struct Item<'a> {
    bytes: &'a [u8],
    consumer: &'a AtomicU64,
    pos: &'a mut u64,
    next: u64,
}

impl Deref for Item<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for Item<'_> {
    fn drop(&mut self) {
        *self.pos = self.next;
        // After the record was read: the kernel reuses its space once it
        // sees the position past it.
        self.consumer.store(self.next, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring buffer in plain memory, written as the kernel writes it.
    struct Fake {
        consumer: Box<AtomicU64>,
        producer: Box<AtomicU64>,
        /// u64 words: the data's alignment.
        data: Vec<u64>,
        /// Where the next record goes.
        tail: u64,
    }

    impl Fake {
        fn new(size: usize, start: u64) -> Self {
            Fake {
                consumer: Box::new(AtomicU64::new(start)),
                producer: Box::new(AtomicU64::new(start)),
                data: vec![0; size / 8],
                tail: start,
            }
        }

        fn size(&self) -> usize {
            self.data.len() * 8
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the words' bytes.
            unsafe {
                std::slice::from_raw_parts_mut(self.data.as_mut_ptr().cast(), self.data.len() * 8)
            }
        }

        /// Writes a record with `flags` and submits it (moves the producer
        /// position past it unless it is busy).
        fn write(&mut self, payload: &[u8], flags: u32) {
            let size = self.size();
            let at = self.tail as usize % size;
            let word = payload.len() as u32 | flags;
            self.bytes()[at..at + 4].copy_from_slice(&word.to_ne_bytes());
            for (i, b) in payload.iter().enumerate() {
                let j = (at + HEADER + i) % size;
                self.bytes()[j] = *b;
            }
            self.tail += (HEADER + payload.len()).next_multiple_of(8) as u64;
            self.producer.store(self.tail, Ordering::Release);
        }

        fn reader(&mut self) -> Reader {
            // SAFETY: the fake outlives the reader in every test.
            unsafe {
                Reader::new(
                    NonNull::from(&*self.consumer),
                    NonNull::from(&*self.producer),
                    self.data.as_ptr().cast(),
                    self.size(),
                )
            }
        }
    }

    fn read_all(r: &mut Reader) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(item) = r.next_record() {
            out.push(item.to_vec());
        }
        out
    }

    #[test]
    fn records_are_read_in_order_and_their_space_given_back() {
        let mut f = Fake::new(4096, 0);
        f.write(b"one", 0);
        f.write(&[7; 100], 0);
        let mut r = f.reader();
        assert_eq!(read_all(&mut r), vec![b"one".to_vec(), vec![7; 100]]);
        // 8 + 3 rounded to 16, then 8 + 100 rounded to 112.
        assert_eq!(f.consumer.load(Ordering::Relaxed), 16 + 112);
        assert!(r.next_record().is_none());
    }

    #[test]
    fn a_record_that_wraps_reads_whole() {
        // Start 24 bytes before the end: the header fits, the payload wraps.
        let mut f = Fake::new(4096, 4096 * 3 - 24);
        let payload: Vec<u8> = (0..=255).collect();
        f.write(&payload, 0);
        f.write(b"after", 0);
        let mut r = f.reader();
        assert_eq!(read_all(&mut r), vec![payload, b"after".to_vec()]);
        assert_eq!(f.consumer.load(Ordering::Relaxed), 4096 * 3 - 24 + 264 + 16);
    }

    #[test]
    fn a_header_at_the_very_end_has_its_payload_at_the_start() {
        let mut f = Fake::new(4096, 4096 - 8);
        f.write(b"0123456789", 0);
        let mut r = f.reader();
        assert_eq!(read_all(&mut r), vec![b"0123456789".to_vec()]);
    }

    #[test]
    fn discarded_records_are_skipped_and_busy_ones_waited_for() {
        let mut f = Fake::new(4096, 0);
        f.write(b"gone", DISCARD);
        f.write(b"kept", 0);
        f.write(b"half-written", BUSY);
        f.write(b"behind it", 0);
        let mut r = f.reader();
        // Stops at the busy one, though one after it is submitted.
        assert_eq!(read_all(&mut r), vec![b"kept".to_vec()]);
        assert_eq!(f.consumer.load(Ordering::Relaxed), 16 + 16);
        // Submitted now: both come.
        let size = f.size();
        let at = 32 % size;
        let word = 12u32;
        f.bytes()[at..at + 4].copy_from_slice(&word.to_ne_bytes());
        assert_eq!(
            read_all(&mut r),
            vec![b"half-written".to_vec(), b"behind it".to_vec()]
        );
    }

    #[test]
    fn a_length_past_the_buffer_is_skipped_unread() {
        let mut f = Fake::new(4096, 0);
        let word = 8000u32;
        f.bytes()[..4].copy_from_slice(&word.to_ne_bytes());
        f.tail = (HEADER + 8000).next_multiple_of(8) as u64;
        f.write(b"next", 0);
        let mut r = f.reader();
        assert_eq!(read_all(&mut r), vec![b"next".to_vec()]);
    }
}
