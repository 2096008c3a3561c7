//! JSON Lines written by hand, straight into a reused buffer: the records
//! of the per-event path (`transition`, `connection`). Byte for byte what
//! serde_json writes for the shapes in `json.rs` (a test compares them),
//! without serde's per-field machinery, `flatten`'s intermediate maps or a
//! formatted timestamp per record: the wall-clock second is formatted once
//! and reused while records fall in it.

use std::{mem::ManuallyDrop, net::IpAddr, ptr};

use crate::{clock::WallClock, kernel::events::Comm};

/// Room made at the start of a record: every record of the event path
/// fits, so [`Text::grow`] is only for the rare long one (many listener
/// pids).
const ROOM: usize = 4 << 10;

/// The buffer a record is written into, taken apart into its pointer,
/// length and capacity for the time of the record. Written through a
/// `&mut Vec<u8>`, every byte appended reloaded the vector's capacity
/// (a byte store may alias it) and checked it: a record is about thirty
/// fields of four appends each. Here the three words stay in registers,
/// and each field checks its room once.
pub(super) struct Text {
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

impl Text {
    /// Takes `buf`'s allocation (leaving it empty) with room for a record.
    pub(super) fn take(buf: &mut Vec<u8>) -> Self {
        let mut v = std::mem::take(buf);
        v.reserve(ROOM);
        let mut v = ManuallyDrop::new(v);
        Text {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cap: v.capacity(),
        }
    }

    /// Gives the allocation, with what was written, back to `buf`.
    pub(super) fn give_back(self, buf: &mut Vec<u8>) {
        let this = ManuallyDrop::new(self);
        // SAFETY: the parts of the vector `take` took apart; `len` bytes
        // were written (every write below counts only bytes it wrote).
        *buf = unsafe { Vec::from_raw_parts(this.ptr, this.len, this.cap) };
    }

    /// A pointer to `n` writable bytes at the end.
    #[inline(always)]
    fn room(&mut self, n: usize) -> *mut u8 {
        if self.cap - self.len < n {
            self.grow(n);
        }
        // SAFETY: `len <= cap`: within the allocation, or one past it.
        unsafe { self.ptr.add(self.len) }
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self, n: usize) {
        // SAFETY: as in `give_back`.
        let mut v = unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) };
        v.reserve(n.max(ROOM));
        let mut v = ManuallyDrop::new(v);
        self.ptr = v.as_mut_ptr();
        self.cap = v.capacity();
    }

    #[inline(always)]
    pub(super) fn push(&mut self, b: u8) {
        let p = self.room(1);
        // SAFETY: `room` made one byte.
        unsafe { p.write(b) };
        self.len += 1;
    }

    #[inline(always)]
    pub(super) fn put(&mut self, bytes: &[u8]) {
        let p = self.room(bytes.len());
        // SAFETY: `room` made `bytes.len()` bytes, which cannot overlap
        // `bytes` (they were not written yet, so nothing refers to them).
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        self.len += bytes.len();
    }
}

impl Drop for Text {
    fn drop(&mut self) {
        // Not given back (a panic): the allocation is freed.
        // SAFETY: as in `give_back`.
        drop(unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) });
    }
}

impl std::io::Write for Text {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.put(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A JSON object being written into a [`Text`].
pub(super) struct Line<'a> {
    out: &'a mut Text,
    first: bool,
}

impl<'a> Line<'a> {
    pub(super) fn new(out: &'a mut Text) -> Self {
        out.push(b'{');
        Line { out, first: true }
    }

    /// `,"k":` (no comma before the first), with one check of room.
    #[inline(always)]
    fn key(&mut self, k: &str) {
        let n = k.len();
        let p = self.out.room(n + 4);
        let comma = usize::from(!self.first);
        self.first = false;
        // SAFETY: `room` made `n + 4` bytes, `n + 3 + comma` are written.
        unsafe {
            p.write(b',');
            let p = p.add(comma);
            p.write(b'"');
            ptr::copy_nonoverlapping(k.as_ptr(), p.add(1), n);
            p.add(1 + n).write(b'"');
            p.add(2 + n).write(b':');
        }
        self.out.len += n + 3 + comma;
    }

    /// A key whose name needs no escaping, and a string value that does.
    #[inline(always)]
    pub(super) fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        escape(self.out, v);
    }

    /// A task's name: copied as it is when it is printable ASCII without
    /// `"` or `\` (nearly every name), else converted and escaped as
    /// [`Line::str`] does.
    #[inline(always)]
    pub(super) fn comm(&mut self, k: &str, c: &Comm) {
        let name = c.bytes();
        if name
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            self.key(k);
            self.quoted(name);
        } else {
            self.str(k, &c.as_str());
        }
    }

    /// `"v"`, with one check of room.
    #[inline(always)]
    fn quoted(&mut self, v: &[u8]) {
        let n = v.len();
        let p = self.out.room(n + 2);
        // SAFETY: `room` made `n + 2` bytes.
        unsafe {
            p.write(b'"');
            ptr::copy_nonoverlapping(v.as_ptr(), p.add(1), n);
            p.add(1 + n).write(b'"');
        }
        self.out.len += n + 2;
    }

    /// A string value known to need no escaping (names, numbers).
    #[inline(always)]
    pub(super) fn plain(&mut self, k: &str, v: &str) {
        self.key(k);
        self.quoted(v.as_bytes());
    }

    #[inline(always)]
    pub(super) fn opt_plain(&mut self, k: &str, v: Option<&str>) {
        match v {
            Some(v) => self.plain(k, v),
            None => self.null(k),
        }
    }

    #[inline(always)]
    pub(super) fn u64(&mut self, k: &str, v: u64) {
        self.key(k);
        write_u64(self.out, v);
    }

    #[inline(always)]
    pub(super) fn opt_u64(&mut self, k: &str, v: Option<u64>) {
        match v {
            Some(v) => self.u64(k, v),
            None => self.null(k),
        }
    }

    #[inline(always)]
    pub(super) fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.out.put(if v { b"true" } else { b"false" });
    }

    #[inline(always)]
    pub(super) fn null(&mut self, k: &str) {
        self.key(k);
        self.out.put(b"null");
    }

    /// `"0x…"`, or null for 0.
    #[inline(always)]
    pub(super) fn hex(&mut self, k: &str, v: u64) {
        if v == 0 {
            return self.null(k);
        }
        self.key(k);
        write_hex(self.out, v);
    }

    #[inline(always)]
    pub(super) fn ip(&mut self, k: &str, a: IpAddr) {
        self.key(k);
        write_ip(self.out, a);
    }

    /// Fields written elsewhere (`"k":v,...`), spliced in as they are.
    pub(super) fn fields(&mut self, json: &str) {
        if json.is_empty() {
            return;
        }
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.put(json.as_bytes());
    }

    /// A nested object under `k`.
    #[inline(always)]
    pub(super) fn object(&mut self, k: &str) -> Line<'_> {
        self.key(k);
        Line::new(self.out)
    }

    /// A nested array under `k`: `items` writes each element's JSON.
    pub(super) fn array<I>(&mut self, k: &str, items: I, mut each: impl FnMut(&mut Text, I::Item))
    where
        I: IntoIterator,
    {
        self.key(k);
        self.out.push(b'[');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            each(self.out, item);
        }
        self.out.push(b']');
    }

    pub(super) fn end(self) {
        self.out.push(b'}');
    }
}

/// Lower-case hex digits.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// `v` in lower-case hex without leading zeros (`0` for 0) at `p`;
/// returns its length (at most 16).
///
/// # Safety
/// `p` is valid for writes of as many bytes as `v` has digits.
#[inline(always)]
unsafe fn write_hex_digits(p: *mut u8, v: u64) -> usize {
    let digits = ((64 - v.leading_zeros()) as usize).div_ceil(4).max(1);
    for i in 0..digits {
        let d = (v >> (4 * (digits - 1 - i))) & 0xf;
        // SAFETY: `i < digits`, the caller's.
        unsafe { p.add(i).write(HEX[d as usize]) };
    }
    digits
}

/// `"0x…"` of a non-zero `v`.
#[inline(always)]
fn write_hex(out: &mut Text, v: u64) {
    let p = out.room(20);
    // SAFETY: `room` made 20 bytes; at most 16 digits and 4 more.
    unsafe {
        p.write(b'"');
        p.add(1).write(b'0');
        p.add(2).write(b'x');
        let digits = write_hex_digits(p.add(3), v);
        p.add(3 + digits).write(b'"');
        out.len += digits + 4;
    }
}

/// An address, quoted, as std's `Display` writes it.
#[inline(always)]
fn write_ip(out: &mut Text, a: IpAddr) {
    match a {
        IpAddr::V4(v4) => {
            // Two quotes, four octets of at most three digits, three points.
            let p = out.room(17);
            // SAFETY: `room` made 17 bytes.
            unsafe {
                p.write(b'"');
                let len = 1 + write_ipv4(p.add(1), v4.octets());
                p.add(len).write(b'"');
                out.len += len + 1;
            }
        }
        IpAddr::V6(v6) => write_ipv6(out, v6),
    }
}

/// `a.b.c.d` at `p`; returns its length (at most 15).
///
/// # Safety
/// `p` is valid for writes of 15 bytes.
#[inline(always)]
unsafe fn write_ipv4(p: *mut u8, octets: [u8; 4]) -> usize {
    let mut len = 0;
    // SAFETY: at most 15 bytes, the caller's.
    unsafe {
        for (i, o) in octets.into_iter().enumerate() {
            if i > 0 {
                p.add(len).write(b'.');
                len += 1;
            }
            let o = usize::from(o);
            if o >= 100 {
                p.add(len).write(b'0' + (o / 100) as u8);
                len += 1;
            }
            if o >= 10 {
                p.add(len).write(b'0' + (o / 10 % 10) as u8);
                len += 1;
            }
            p.add(len).write(b'0' + (o % 10) as u8);
            len += 1;
        }
    }
    len
}

/// An IPv6 address, quoted, as std's `Display` writes it (RFC 5952: the
/// first longest run of two or more zero groups as `::`, hex in lower
/// case without leading zeros; IPv4-mapped ones as `::ffff:a.b.c.d`),
/// without `fmt`'s call per group.
fn write_ipv6(out: &mut Text, a: std::net::Ipv6Addr) {
    // Two quotes and at most 39 characters (eight groups of four, seven
    // colons).
    let p = out.room(41);
    let groups = a.segments();
    let mut len = 0;
    // SAFETY: `room` made 41 bytes; at most 41 are written.
    unsafe {
        p.write(b'"');
        len += 1;
        if let Some(v4) = a.to_ipv4_mapped() {
            ptr::copy_nonoverlapping(b"::ffff:".as_ptr(), p.add(len), 7);
            len += 7;
            len += write_ipv4(p.add(len), v4.octets());
        } else {
            let (mut run, mut longest) = ((0, 0), (0, 0));
            for (i, &g) in groups.iter().enumerate() {
                if g == 0 {
                    if run.1 == 0 {
                        run.0 = i;
                    }
                    run.1 += 1;
                    if run.1 > longest.1 {
                        longest = run;
                    }
                } else {
                    run = (0, 0);
                }
            }
            let (skip_from, skip_to) = if longest.1 > 1 {
                (longest.0, longest.0 + longest.1)
            } else {
                (8, 8)
            };
            let mut i = 0;
            while i < 8 {
                if i == skip_from {
                    ptr::copy_nonoverlapping(b"::".as_ptr(), p.add(len), 2);
                    len += 2;
                    i = skip_to;
                    continue;
                }
                if i > 0 && i != skip_to {
                    p.add(len).write(b':');
                    len += 1;
                }
                len += write_hex_digits(p.add(len), u64::from(groups[i]));
                i += 1;
            }
        }
        p.add(len).write(b'"');
        len += 1;
    }
    out.len += len;
}

/// Two decimal digits of every number below 100.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// Writes the two digits of `pair` (below 100) at `p`.
///
/// # Safety
/// `p` is valid for writes of two bytes.
#[inline(always)]
unsafe fn write_pair(p: *mut u8, pair: u32) {
    let i = pair as usize * 2;
    // SAFETY: the caller's `p`; two bytes of the table.
    unsafe { ptr::copy_nonoverlapping(DIGIT_PAIRS[i..i + 2].as_ptr(), p, 2) };
}

/// `v` in decimal, written in place at the end of `out`. Eight digits at
/// a time from the right (in 32 bits), so the division of the rest runs
/// beside the digits' own: the nanosecond counts of the lines are 13 to
/// 19 digits long, and one digit pair after the other was a chain of
/// dependent multiplications.
#[inline(always)]
pub(super) fn write_u64(out: &mut Text, v: u64) {
    let len = v.checked_ilog10().map_or(1, |l| l as usize + 1);
    let p = out.room(20);
    let (mut x, mut end) = (v, len);
    // SAFETY: `room` made 20 bytes; digits are written at `p[..len]`
    // (`len` at most 20), right to left.
    unsafe {
        while x >= 100_000_000 {
            let mut low = (x % 100_000_000) as u32;
            x /= 100_000_000;
            end -= 8;
            for j in [6, 4, 2, 0] {
                write_pair(p.add(end + j), low % 100);
                low /= 100;
            }
        }
        let mut x = x as u32;
        while x >= 100 {
            end -= 2;
            write_pair(p.add(end), x % 100);
            x /= 100;
        }
        if x >= 10 {
            write_pair(p, x);
        } else {
            p.write(b'0' + x as u8);
        }
    }
    out.len += len;
}

/// `v` as a JSON string, escaped as serde_json does: `"` and `\`, the
/// short escapes `\b \f \n \r \t`, other control characters as `\u00XX`;
/// everything else as it is.
pub(super) fn escape(out: &mut Text, v: &str) {
    out.push(b'"');
    let bytes = v.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0..=0x1f => b'u',
            _ => continue,
        };
        out.put(&bytes[start..i]);
        out.push(b'\\');
        out.push(short);
        if short == b'u' {
            out.put(b"00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
        start = i + 1;
    }
    out.put(&bytes[start..]);
    out.push(b'"');
}

/// RFC 3339 timestamps with nanoseconds, UTC (`2026-11-23T20:15:01.123456789Z`,
/// as `humantime` formats them), with the text of the last two seconds
/// cached: a connection record's start and end are often a minute apart
/// (TIME_WAIT), and consecutive records go back and forth between them.
pub(super) struct Times {
    clock: WallClock,
    /// Wall-clock seconds and their `YYYY-MM-DDTHH:MM:SS.` (`u64::MAX`:
    /// none yet).
    seconds: [(u64, [u8; 20]); 2],
    /// The entry of `seconds` the next new second replaces.
    oldest: usize,
}

impl Times {
    pub(super) fn new(clock: WallClock) -> Self {
        Times {
            clock,
            seconds: [(u64::MAX, [0; 20]); 2],
            oldest: 0,
        }
    }

    /// The timestamp of `mono_ns`, quoted, into `out`.
    #[inline(always)]
    pub(super) fn write(&mut self, out: &mut Text, mono_ns: u64) {
        let ns = self.clock.wall_ns(mono_ns);
        let (sec, frac) = (ns / 1_000_000_000, (ns % 1_000_000_000) as u32);
        let i = match self.seconds.iter().position(|&(at, _)| at == sec) {
            Some(i) => i,
            None => match self.cache(sec) {
                Some(i) => i,
                None => {
                    // Years past 9999: no cache, the full form.
                    use std::io::Write as _;
                    let _ = write!(out, "\"{}\"", self.clock.rfc3339_display(mono_ns));
                    return;
                }
            },
        };
        self.oldest = 1 - i;
        let prefix = &self.seconds[i].1;
        let p = out.room(32);
        // SAFETY: `room` made 32 bytes: a quote, the 20 of the prefix,
        // 9 digits, `Z` and a quote.
        unsafe {
            p.write(b'"');
            ptr::copy_nonoverlapping(prefix.as_ptr(), p.add(1), 20);
            let mut f = frac;
            for j in (0..9).rev() {
                p.add(21 + j).write(b'0' + (f % 10) as u8);
                f /= 10;
            }
            p.add(30).write(b'Z');
            p.add(31).write(b'"');
        }
        out.len += 32;
    }

    /// Formats second `sec` into the older entry of the cache; `None`
    /// past the year 9999.
    #[cold]
    #[inline(never)]
    fn cache(&mut self, sec: u64) -> Option<usize> {
        let text = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(sec),
        )
        .to_string();
        // "YYYY-MM-DDTHH:MM:SSZ": keep all but the Z, add the point.
        let head = text.as_bytes().get(..19)?;
        let i = self.oldest;
        self.seconds[i].0 = sec;
        self.seconds[i].1[..19].copy_from_slice(head);
        self.seconds[i].1[19] = b'.';
        Some(i)
    }

    #[inline(always)]
    pub(super) fn time(&mut self, l: &mut Line<'_>, k: &str, mono_ns: u64) {
        l.key(k);
        self.write(l.out, mono_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `write` writes after `before`.
    fn written(before: &[u8], write: impl FnOnce(&mut Text)) -> Vec<u8> {
        let mut buf = before.to_vec();
        let mut out = Text::take(&mut buf);
        write(&mut out);
        out.give_back(&mut buf);
        buf
    }

    #[test]
    fn numbers_and_addresses_are_written_as_std_formats_them() {
        let mut n = vec![
            0,
            1,
            9,
            10,
            99,
            100,
            101,
            999,
            1000,
            65535,
            u64::MAX,
            u64::MAX / 10,
        ];
        n.extend((0..20).map(|p| 10u64.pow(p)));
        n.extend((1..20).map(|p| 10u64.pow(p) - 1));
        n.extend((0..64).map(|b| 1u64 << b));
        for v in n {
            let buf = written(b"x", |out| write_u64(out, v));
            assert_eq!(buf, format!("x{v}").into_bytes());
        }
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
        ] {
            let buf = written(b"", |out| write_ip(out, a.parse().unwrap()));
            assert_eq!(buf, format!("\"{a}\"").into_bytes());
        }
        let buf = written(b"", |out| write_ip(out, "fe80::1".parse().unwrap()));
        assert_eq!(buf, b"\"fe80::1\"");
    }

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        let mut all = String::new();
        for c in 0u8..0x80 {
            all.push(c as char);
        }
        all.push_str("é漢\u{fffd}");
        for s in [all.as_str(), "", "plain", "a\"b\\c\n", "\u{7f}\u{1f}"] {
            let buf = written(b"", |out| escape(out, s));
            assert_eq!(
                String::from_utf8(buf).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    #[test]
    fn task_names_are_written_as_their_escaped_strings() {
        let mut names: Vec<[u8; 16]> = [
            &b"nginx"[..],
            b"",
            b"a\"b",
            b"back\\slash",
            b"tab\there",
            b"del\x7f",
            b"caf\xc3\xa9",
            b"bad\xff\xfeutf8",
            b" ~!{}",
        ]
        .iter()
        .map(|n| {
            let mut raw = [0u8; 16];
            raw[..n.len()].copy_from_slice(n);
            raw
        })
        .collect();
        // Sixteen bytes without a NUL, and every byte value alone.
        names.push(*b"0123456789abcdef");
        names.extend((1..=255u8).map(|b| [b; 16]));
        for raw in names {
            let c = Comm::new(raw);
            let fast = written(b"", |out| {
                let mut l = Line::new(out);
                l.comm("comm", &c);
                l.end();
            });
            let slow = written(b"", |out| {
                let mut l = Line::new(out);
                l.str("comm", &c.as_str());
                l.end();
            });
            assert_eq!(fast, slow, "{raw:?}");
        }
    }

    #[test]
    fn timestamps_are_humantimes_with_two_seconds_cached() {
        let clock = WallClock::with_offset_ns(1_795_392_000_000_000_000);
        let mut t = Times::new(clock);
        for mono in [
            0,
            1,
            999_999_999,
            1_000_000_000,
            1_000_000_123,
            86_399_999_999_999,
            // Back and forth between two seconds, then a third.
            60_000_000_001,
            1_000_000_007,
            60_000_000_002,
            2_000_000_000,
            60_000_000_003,
            1_000_000_009,
        ] {
            let buf = written(b"", |out| t.write(out, mono));
            assert_eq!(
                String::from_utf8(buf).unwrap(),
                format!("\"{}\"", clock.rfc3339(mono))
            );
        }
    }

    #[test]
    fn numbers_addresses_and_hex() {
        let buf = written(b"", |out| {
            let mut l = Line::new(out);
            l.u64("a", u64::MAX);
            l.hex("s", 0xffff_8880_1234_5678);
            l.hex("z", 0);
            l.hex("one", 1);
            l.ip("v4", "10.0.255.1".parse().unwrap());
            l.ip("v6", "fd00::1".parse().unwrap());
            l.bool("b", true);
            l.opt_u64("n", None);
            l.end();
        });
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"{"a":18446744073709551615,"s":"0xffff888012345678","z":null,"one":"0x1","v4":"10.0.255.1","v6":"fd00::1","b":true,"n":null}"#
        );
    }

    #[test]
    fn a_record_longer_than_its_room_grows_the_buffer() {
        let pids: Vec<u64> = (0..3000).map(|i| u64::MAX - i).collect();
        let long = "x".repeat(3 * ROOM);
        let buf = written(b"head", |out| {
            let mut l = Line::new(out);
            l.array("pids", &pids, |out, p| write_u64(out, *p));
            l.str("long", &long);
            l.end();
        });
        let list: Vec<String> = pids.iter().map(u64::to_string).collect();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            format!("head{{\"pids\":[{}],\"long\":\"{long}\"}}", list.join(","))
        );
    }

    #[test]
    fn ipv6_addresses_are_written_as_std_formats_them() {
        use std::net::Ipv6Addr;
        let mut all: Vec<Ipv6Addr> = [
            "::",
            "::1",
            "1::",
            "fe80::1",
            "2001:db8::8a2e:370:7334",
            "2001:db8:0:0:1:0:0:1",
            "2001:0:0:1:0:0:0:1",
            "1:0:1:0:1:0:1:0",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::10.0.0.1",
            "64:ff9b::192.0.2.33",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        // Groups zero half of the time, of every width otherwise.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut g = [0u16; 8];
            for s in &mut g {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x & 1 == 0 {
                    *s = (x >> 8) as u16 >> ((x >> 40) % 16);
                }
            }
            all.push(Ipv6Addr::from(g));
        }
        for a in all {
            let buf = written(b"", |out| write_ip(out, IpAddr::V6(a)));
            assert_eq!(String::from_utf8(buf).unwrap(), format!("\"{a}\""));
        }
    }
}
