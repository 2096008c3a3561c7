//! Where records go: a writer thread of their own, so that the thread that
//! drains the ring buffer never waits for stdout.
//!
//! Records are written into 256 KiB chunks; a full chunk (or the rest, at
//! each flush) is handed to the writer thread, which writes it and hands
//! the emptied chunk back. At most `--output-buffer` of chunks exist (16
//! MiB by default):
//! when the reader of stdout falls that far behind (a stalled pipe, a
//! paused terminal), the records of the chunk that finds no free chunk are
//! dropped and counted (`output_dropped` in the stats, and a warning on
//! stderr), and the agent goes on draining the kernel's events, tracking
//! connections and counting. When the reader catches up, output resumes.

use std::{
    io::{self, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// A chunk's size. Each hand-over wakes the writer thread (a futex wake,
/// a few microseconds in a VM), so chunks are large: about 500 JSON
/// transitions per wake.
pub const CHUNK_BYTES: usize = 256 << 10;
/// A chunk is handed to the writer once less than this is left in it, so
/// that records, written straight into the chunk, do not outgrow it (a
/// record longer than this makes the chunk grow: allocated once, then
/// reused).
const RECORD_ROOM: usize = 16 << 10;
/// Bytes of records that may wait for a slow reader by default
/// (`--output-buffer`): a second or more of JSON at full churn (a file on
/// a disk busy with other writes falls that far behind).
pub const DEFAULT_BUFFER: usize = 16 << 20;

/// Something records are written to, record by record.
pub trait RecordWrite: Write {
    /// The bytes written since the last call form one whole record (or
    /// several): a point where they may be handed on.
    fn record_done(&mut self) {}

    /// The buffer records are appended to, where the writer has one: a
    /// record written there directly is not copied again.
    fn record_buffer(&mut self) -> Option<&mut Vec<u8>> {
        None
    }

    /// Records dropped because the reader was too slow.
    fn dropped(&self) -> u64 {
        0
    }

    /// From now on, a full buffer waits for the reader instead of dropping
    /// records, as long as the reader takes something every `within` (at
    /// exit: nothing is left to drain, and the last records must come).
    fn wait_when_full(&mut self, within: Duration) {
        let _ = within;
    }

    /// Writes out everything, waiting at most `within`; false if the
    /// reader did not take it in time.
    fn finish(&mut self, within: Duration) -> io::Result<bool> {
        let _ = within;
        self.flush().map(|()| true)
    }
}

impl RecordWrite for Vec<u8> {
    fn record_buffer(&mut self) -> Option<&mut Vec<u8>> {
        Some(self)
    }
}
impl<W: Write> RecordWrite for io::BufWriter<W> {}

/// Records on their way to the writer thread.
pub struct Sink {
    chunk: Vec<u8>,
    /// Records in `chunk`, and where the last one ends.
    records: u64,
    mark: usize,
    /// Chunks made so far, and the most there may be.
    made: usize,
    max_chunks: usize,
    to_writer: Option<SyncSender<Vec<u8>>>,
    free: Receiver<Vec<u8>>,
    /// Set by the writer when a write failed (its error is then returned
    /// by the next flush).
    failed: Arc<AtomicBool>,
    error: Arc<std::sync::Mutex<Option<io::Error>>>,
    /// Bytes the writer has written so far.
    written: Arc<AtomicU64>,
    writer: Option<thread::JoinHandle<()>>,
    /// Records dropped because the reader was too slow.
    pub dropped: u64,
    /// Set at exit: how long a full buffer waits for the reader's progress
    /// before records are dropped.
    patience: Option<Duration>,
}

impl Sink {
    /// Starts the writer thread on `out`, with at most `buffer` bytes of
    /// records (rounded up to whole chunks) waiting for it.
    pub fn new<W: Write + Send + 'static>(mut out: W, buffer: usize) -> io::Result<Sink> {
        let max_chunks = buffer.div_ceil(CHUNK_BYTES).max(2);
        let (to_writer, work) = mpsc::sync_channel::<Vec<u8>>(max_chunks);
        let (give_back, free) = mpsc::sync_channel::<Vec<u8>>(max_chunks);
        let failed = Arc::new(AtomicBool::new(false));
        let error = Arc::new(std::sync::Mutex::new(None));
        let written = Arc::new(AtomicU64::new(0));
        let (f, e, w) = (failed.clone(), error.clone(), written.clone());
        let writer = thread::Builder::new()
            .name("tracer-output".into())
            .spawn(move || {
                for mut chunk in work {
                    if !f.load(Ordering::Relaxed) {
                        if let Err(err) = out.write_all(&chunk).and_then(|()| out.flush()) {
                            *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                            f.store(true, Ordering::Relaxed);
                        }
                        w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    chunk.clear();
                    if give_back.send(chunk).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Sink {
            chunk: Vec::with_capacity(CHUNK_BYTES),
            records: 0,
            mark: 0,
            made: 1,
            max_chunks,
            to_writer: Some(to_writer),
            free,
            failed,
            error,
            written,
            writer: Some(writer),
            dropped: 0,
            patience: None,
        })
    }

    /// Hands the current chunk to the writer and takes an empty one: a
    /// returned one, a new one while fewer than the most there may be, or,
    /// when the writer holds them all, this chunk again, emptied, its
    /// records counted as dropped.
    fn hand_off(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let next = match self.free.try_recv() {
            Ok(c) => Some(c),
            Err(_) if self.made < self.max_chunks => {
                self.made += 1;
                Some(Vec::with_capacity(CHUNK_BYTES))
            }
            Err(_) => self.patience.and_then(|p| self.wait_for_free(p)),
        };
        match (next, &self.to_writer) {
            (Some(next), Some(tx)) => {
                let full = std::mem::replace(&mut self.chunk, next);
                // Cannot block: the channel holds every chunk there is.
                let _ = tx.send(full);
            }
            _ => {
                self.dropped += self.records;
                self.chunk.clear();
            }
        }
        self.records = 0;
        self.mark = 0;
    }

    /// A chunk the writer gives back, waited for while it makes progress
    /// (bytes written) at least every `within`.
    fn wait_for_free(&self, within: Duration) -> Option<Vec<u8>> {
        let mut written = self.written.load(Ordering::Relaxed);
        loop {
            match self.free.recv_timeout(within) {
                Ok(c) => return Some(c),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = self.written.load(Ordering::Relaxed);
                    if now == written || self.failed.load(Ordering::Relaxed) {
                        return None;
                    }
                    written = now;
                }
            }
        }
    }

    fn check(&self) -> io::Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            let e = self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Err(e.unwrap_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe)));
        }
        Ok(())
    }
}

impl RecordWrite for Sink {
    fn record_buffer(&mut self) -> Option<&mut Vec<u8>> {
        Some(&mut self.chunk)
    }

    fn record_done(&mut self) {
        if self.chunk.len() > self.mark {
            self.records += 1;
            self.mark = self.chunk.len();
        }
        if self.chunk.len() > CHUNK_BYTES - RECORD_ROOM {
            self.hand_off();
        }
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }

    fn wait_when_full(&mut self, within: Duration) {
        self.patience = Some(within);
    }

    /// Hands on what is written and waits, up to `within`, for the writer
    /// to have written everything. False if it could not (the reader is
    /// stalled): the rest is abandoned.
    fn finish(&mut self, within: Duration) -> io::Result<bool> {
        self.hand_off();
        self.to_writer = None;
        let Some(writer) = self.writer.take() else {
            return Ok(true);
        };
        // A reader that takes the records, however slowly (a file on a
        // busy disk), gets them all; one that takes nothing for `within`
        // is left.
        let mut written = self.written.load(Ordering::Relaxed);
        let mut progress_at = Instant::now();
        while !writer.is_finished() {
            let now = self.written.load(Ordering::Relaxed);
            if now != written {
                written = now;
                progress_at = Instant::now();
            } else if progress_at.elapsed() >= within {
                return Ok(false);
            }
            thread::sleep(Duration::from_millis(1));
        }
        let _ = writer.join();
        self.check()?;
        Ok(true)
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.chunk.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.chunk.extend_from_slice(buf);
        Ok(())
    }

    /// Hands on the records written so far; reports a failed write (a
    /// reader that went away).
    fn flush(&mut self) -> io::Result<()> {
        self.hand_off();
        self.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer that blocks while `gate` is held, then appends to `got`.
    #[derive(Clone)]
    struct Gated {
        gate: Arc<Mutex<()>>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn record(s: &mut Sink, i: u64) {
        writeln!(s, "{i:0>1000}").unwrap();
        s.record_done();
    }

    #[test]
    fn a_stalled_reader_costs_dropped_records_not_a_blocked_writer() {
        let g = Gated {
            gate: Arc::new(Mutex::new(())),
            got: Default::default(),
        };
        let stall = g.gate.lock().unwrap();
        let mut s = Sink::new(g.clone(), 4 << 20).unwrap();
        let started = Instant::now();
        // 10 MiB of records: more than the chunks can hold.
        let n = 10 * 1024;
        for i in 0..n {
            record(&mut s, i);
        }
        s.flush().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "never blocked");
        assert!(s.dropped > 0, "some records dropped");
        assert!(s.dropped < n);
        drop(stall);
        assert!(s.finish(Duration::from_secs(10)).unwrap());
        let got = g.got.lock().unwrap();
        let lines = got.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() as u64;
        assert_eq!(lines + s.dropped, n, "every record written or counted");
        // Whole records only, in order.
        let mut last = None;
        for l in got.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert_eq!(l.len(), 1000);
            let i: u64 = std::str::from_utf8(l).unwrap().parse().unwrap();
            assert!(last.is_none_or(|p| i > p));
            last = Some(i);
        }
    }

    /// At exit the last records wait for a reader that pauses (here 300
    /// ms) instead of being dropped; before, the same burst drops some.
    #[test]
    fn at_exit_a_slow_reader_gets_every_record() {
        let burst = |patient: bool| {
            let g = Gated {
                gate: Arc::new(Mutex::new(())),
                got: Default::default(),
            };
            let gate = g.gate.clone();
            let (held, hold) = mpsc::channel();
            let pause = thread::spawn(move || {
                let _stall = gate.lock().unwrap();
                held.send(()).unwrap();
                thread::sleep(Duration::from_millis(300));
            });
            hold.recv().unwrap();
            let mut s = Sink::new(g.clone(), 2 * CHUNK_BYTES).unwrap();
            if patient {
                s.wait_when_full(Duration::from_secs(1));
            }
            for i in 0..1000 {
                record(&mut s, i);
            }
            assert!(s.finish(Duration::from_secs(10)).unwrap());
            pause.join().unwrap();
            let got = g.got.lock().unwrap();
            let lines = got.iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(lines + s.dropped, 1000);
            s.dropped
        };
        assert!(burst(false) > 0, "the burst overflows the buffer");
        assert_eq!(burst(true), 0);
    }

    #[test]
    fn everything_arrives_when_the_reader_keeps_up() {
        let g = Gated {
            gate: Arc::new(Mutex::new(())),
            got: Default::default(),
        };
        let mut s = Sink::new(g.clone(), 4 << 20).unwrap();
        for i in 0..5000 {
            record(&mut s, i);
            if i % 100 == 0 {
                s.flush().unwrap();
            }
        }
        assert!(s.finish(Duration::from_secs(10)).unwrap());
        assert_eq!(s.dropped, 0);
        assert_eq!(g.got.lock().unwrap().len(), 5000 * 1001);
    }

    #[test]
    fn a_reader_that_went_away_is_reported() {
        struct Gone;
        impl Write for Gone {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut s = Sink::new(Gone, 4 << 20).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            record(&mut s, 2);
            match s.flush() {
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
                    break;
                }
                Ok(()) => assert!(Instant::now() < deadline),
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}
