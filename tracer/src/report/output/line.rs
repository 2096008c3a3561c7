//! JSON Lines written by hand, straight into a reused buffer: the records
//! of the per-event path (`transition`, `connection`). Byte for byte what
//! serde_json writes for the shapes in `json.rs` (a test compares them),
//! without serde's per-field machinery, `flatten`'s intermediate maps or a
//! formatted timestamp per record: the wall-clock second is formatted once
//! and reused while records fall in it.

use std::net::IpAddr;

use crate::{clock::WallClock, kernel::events::Comm};

/// A JSON object being written into `buf`.
pub(super) struct Line<'a> {
    buf: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Line<'a> {
    pub(super) fn new(buf: &'a mut Vec<u8>) -> Self {
        buf.push(b'{');
        Line { buf, first: true }
    }

    #[inline(always)]
    fn key(&mut self, k: &str) {
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(k.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    /// A key whose name needs no escaping, and a string value that does.
    #[inline(always)]
    pub(super) fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        escape(self.buf, v);
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
            self.buf.push(b'"');
            self.buf.extend_from_slice(name);
            self.buf.push(b'"');
        } else {
            self.str(k, &c.as_str());
        }
    }

    /// A string value known to need no escaping (names, numbers).
    #[inline(always)]
    pub(super) fn plain(&mut self, k: &str, v: &str) {
        self.key(k);
        self.buf.push(b'"');
        self.buf.extend_from_slice(v.as_bytes());
        self.buf.push(b'"');
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
        write_u64(self.buf, v);
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
        self.buf
            .extend_from_slice(if v { b"true" } else { b"false" });
    }

    #[inline(always)]
    pub(super) fn null(&mut self, k: &str) {
        self.key(k);
        self.buf.extend_from_slice(b"null");
    }

    /// `"0x…"`, or null for 0.
    #[inline(always)]
    pub(super) fn hex(&mut self, k: &str, v: u64) {
        if v == 0 {
            return self.null(k);
        }
        self.key(k);
        write_hex(self.buf, v);
    }

    #[inline(always)]
    pub(super) fn ip(&mut self, k: &str, a: IpAddr) {
        self.key(k);
        write_ip(self.buf, a);
    }

    /// Fields written elsewhere (`"k":v,...`), spliced in as they are.
    pub(super) fn fields(&mut self, json: &str) {
        if json.is_empty() {
            return;
        }
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.buf.extend_from_slice(json.as_bytes());
    }

    /// A nested object under `k`.
    #[inline(always)]
    pub(super) fn object(&mut self, k: &str) -> Line<'_> {
        self.key(k);
        Line::new(self.buf)
    }

    /// A nested array under `k`: `items` writes each element's JSON.
    pub(super) fn array<I>(
        &mut self,
        k: &str,
        items: I,
        mut each: impl FnMut(&mut Vec<u8>, I::Item),
    ) where
        I: IntoIterator,
    {
        self.key(k);
        self.buf.push(b'[');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.buf.push(b',');
            }
            each(self.buf, item);
        }
        self.buf.push(b']');
    }

    pub(super) fn end(self) {
        self.buf.push(b'}');
    }
}

/// `"0x…"` of a non-zero `v`.
fn write_hex(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(b"\"0x");
    let digits = (64 - v.leading_zeros()).div_ceil(4);
    for i in (0..digits).rev() {
        buf.push(b"0123456789abcdef"[((v >> (4 * i)) & 0xf) as usize]);
    }
    buf.push(b'"');
}

/// An address, quoted.
fn write_ip(buf: &mut Vec<u8>, a: IpAddr) {
    buf.push(b'"');
    match a {
        IpAddr::V4(v4) => {
            // As `write_u64`: a block of constant size, written in place
            // and cut to length.
            let start = buf.len();
            buf.extend_from_slice(&[0; 15]);
            let text = &mut buf[start..start + 15];
            let mut len = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let o = usize::from(o);
                if o >= 100 {
                    text[len] = b'0' + (o / 100) as u8;
                    len += 1;
                }
                if o >= 10 {
                    text[len] = b'0' + (o / 10 % 10) as u8;
                    len += 1;
                }
                text[len] = b'0' + (o % 10) as u8;
                len += 1;
            }
            buf.truncate(start + len);
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            let _ = write!(buf, "{v6}");
        }
    }
    buf.push(b'"');
}

/// Two decimal digits of every number below 100.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// `v` in decimal. Twenty zeros are appended (a copy of constant size:
/// a few stores) and the digits written over them in place, then the rest
/// cut off: appending a slice of run-time length is a call to `memcpy`,
/// and the JSON lines hold a dozen numbers. (Digits written into a stack
/// block first and copied from it stall on the store forwarding.)
pub(super) fn write_u64(buf: &mut Vec<u8>, v: u64) {
    let start = buf.len();
    let len = v.checked_ilog10().map_or(1, |l| l as usize + 1);
    buf.extend_from_slice(&[0; 20]);
    let text = &mut buf[start..start + len];
    let (mut x, mut end) = (v, len);
    while x >= 100 {
        let pair = (x % 100) as usize * 2;
        x /= 100;
        end -= 2;
        text[end..end + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if x >= 10 {
        let pair = x as usize * 2;
        text[..2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        text[0] = b'0' + x as u8;
    }
    buf.truncate(start + len);
}

/// `v` as a JSON string, escaped as serde_json does: `"` and `\`, the
/// short escapes `\b \f \n \r \t`, other control characters as `\u00XX`;
/// everything else as it is.
pub(super) fn escape(buf: &mut Vec<u8>, v: &str) {
    buf.push(b'"');
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
        buf.extend_from_slice(&bytes[start..i]);
        buf.push(b'\\');
        buf.push(short);
        if short == b'u' {
            buf.extend_from_slice(b"00");
            buf.push(b"0123456789abcdef"[usize::from(b >> 4)]);
            buf.push(b"0123456789abcdef"[usize::from(b & 0xf)]);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
    buf.push(b'"');
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

    /// The timestamp of `mono_ns`, quoted, into `buf`.
    pub(super) fn write(&mut self, buf: &mut Vec<u8>, mono_ns: u64) {
        let ns = self.clock.wall_ns(mono_ns);
        let (sec, frac) = (ns / 1_000_000_000, (ns % 1_000_000_000) as u32);
        let i = match self.seconds.iter().position(|&(at, _)| at == sec) {
            Some(i) => i,
            None => {
                let text = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(sec),
                )
                .to_string();
                // "YYYY-MM-DDTHH:MM:SSZ": keep all but the Z, add the point.
                let Some(head) = text.as_bytes().get(..19) else {
                    // Years past 9999: no cache, the full form.
                    use std::io::Write as _;
                    let _ = write!(buf, "\"{}\"", self.clock.rfc3339_display(mono_ns));
                    return;
                };
                let i = self.oldest;
                self.seconds[i].0 = sec;
                self.seconds[i].1[..19].copy_from_slice(head);
                self.seconds[i].1[19] = b'.';
                i
            }
        };
        self.oldest = 1 - i;
        let prefix = &self.seconds[i].1;
        buf.push(b'"');
        buf.extend_from_slice(prefix);
        // The nanoseconds written in place (see `write_u64`).
        let start = buf.len();
        buf.extend_from_slice(b"000000000Z\"");
        let mut f = frac;
        for d in buf[start..start + 9].iter_mut().rev() {
            *d = b'0' + (f % 10) as u8;
            f /= 10;
        }
    }

    #[inline(always)]
    pub(super) fn time(&mut self, l: &mut Line<'_>, k: &str, mono_ns: u64) {
        l.key(k);
        self.write(l.buf, mono_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let mut buf = b"x".to_vec();
            write_u64(&mut buf, v);
            assert_eq!(buf, format!("x{v}").into_bytes());
        }
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
        ] {
            let mut buf = Vec::new();
            write_ip(&mut buf, a.parse().unwrap());
            assert_eq!(buf, format!("\"{a}\"").into_bytes());
        }
        let mut buf = Vec::new();
        write_ip(&mut buf, "fe80::1".parse().unwrap());
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
            let mut buf = Vec::new();
            escape(&mut buf, s);
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
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            let mut l = Line::new(&mut fast);
            l.comm("comm", &c);
            l.end();
            let mut l = Line::new(&mut slow);
            l.str("comm", &c.as_str());
            l.end();
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
            let mut buf = Vec::new();
            t.write(&mut buf, mono);
            assert_eq!(
                String::from_utf8(buf).unwrap(),
                format!("\"{}\"", clock.rfc3339(mono))
            );
        }
    }

    #[test]
    fn numbers_addresses_and_hex() {
        let mut buf = Vec::new();
        let mut l = Line::new(&mut buf);
        l.u64("a", u64::MAX);
        l.hex("s", 0xffff_8880_1234_5678);
        l.hex("z", 0);
        l.hex("one", 1);
        l.ip("v4", "10.0.255.1".parse().unwrap());
        l.ip("v6", "fd00::1".parse().unwrap());
        l.bool("b", true);
        l.opt_u64("n", None);
        l.end();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"{"a":18446744073709551615,"s":"0xffff888012345678","z":null,"one":"0x1","v4":"10.0.255.1","v6":"fd00::1","b":true,"n":null}"#
        );
    }
}
