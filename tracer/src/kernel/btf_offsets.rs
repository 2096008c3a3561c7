//! Kernel struct offsets, read from the running kernel's BTF at load time
//! and handed to the kernel program as constants (Rust eBPF has no CO-RE
//! field relocations, and offsets differ between kernels and configs).
//!
//! A small reader of the BTF format (`Documentation/bpf/btf.rst`) rather
//! than a crate: aya's `Btf` cannot look up member offsets, and `btfparse`
//! builds a model of every type, which took 250-280 ms of the tracer's start
//! here; this one walks the type section once and takes a few ms. A test
//! cross-checks its answers with `btfparse` on the running kernel.

use thiserror::Error;
use tracer_common::OFFSET_UNKNOWN;

pub use crate::kernel::reset_reasons::ResetReasons;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const BTF_MAGIC: u16 = 0xeb9f;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("reading {VMLINUX_BTF}: {0}")]
    Read(String),
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("truncated BTF type section")]
    Truncated,
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
}

/// Offsets the kernel program needs; [`OFFSET_UNKNOWN`] where BTF lacks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock_common` → `skc_net.net` (`struct net *`).
    pub skc_net: u32,
    /// `struct net` → `ns.inum` (the namespace's inode number).
    pub net_inum: u32,
    /// `struct sock_common` members the timewait program reads, in the
    /// order of [`SOCK_COMMON_MEMBERS`].
    pub sock_common: [u32; 7],
    /// `struct sock` → `sk_protocol` (a `u16` since 5.6).
    pub sk_protocol: u32,
    /// `struct inet_sock` → `inet_sport` (the local port, network order).
    pub inet_sport: u32,
    /// `reason` in the `tcp:tcp_send_reset` record (`struct
    /// trace_event_raw_tcp_send_reset`, since 6.10).
    pub rst_reason: u32,
}

/// What the agent reads from the kernel's BTF at load time.
pub struct KernelBtf {
    pub offsets: KernelOffsets,
    /// The names of `enum sk_rst_reason`, where the reset tracepoint
    /// carries one (else empty).
    pub reset_reasons: ResetReasons,
}

/// Members of `struct sock_common` read from timewait sockets.
pub const SOCK_COMMON_MEMBERS: [&str; 7] = [
    "skc_family",
    "skc_num",
    "skc_dport",
    "skc_rcv_saddr",
    "skc_daddr",
    "skc_v6_rcv_saddr",
    "skc_v6_daddr",
];

impl KernelOffsets {
    pub const UNKNOWN: KernelOffsets = KernelOffsets {
        skc_net: OFFSET_UNKNOWN,
        net_inum: OFFSET_UNKNOWN,
        sock_common: [OFFSET_UNKNOWN; 7],
        sk_protocol: OFFSET_UNKNOWN,
        inet_sport: OFFSET_UNKNOWN,
        rst_reason: OFFSET_UNKNOWN,
    };

    /// Everything the BTF tracepoint program reads is known.
    pub fn btf_path_known(&self) -> bool {
        self.timewait_known()
            && self.sk_protocol != OFFSET_UNKNOWN
            && self.inet_sport != OFFSET_UNKNOWN
    }

    /// Everything the timewait program needs is known.
    pub fn timewait_known(&self) -> bool {
        self.netns_known() && self.sock_common.iter().all(|&o| o != OFFSET_UNKNOWN)
    }

    pub fn netns_known(&self) -> bool {
        self.skc_net != OFFSET_UNKNOWN && self.net_inum != OFFSET_UNKNOWN
    }
}

pub fn from_sys_fs() -> Result<KernelBtf, BtfError> {
    let data = std::fs::read(VMLINUX_BTF).map_err(|e| BtfError::Read(e.to_string()))?;
    let btf = Btf::parse(&data)?;
    let rst_reason = btf
        .member_offset("trace_event_raw_tcp_send_reset", "reason")
        .unwrap_or(OFFSET_UNKNOWN);
    let reset_reasons = if rst_reason == OFFSET_UNKNOWN {
        ResetReasons::default()
    } else {
        ResetReasons::from_enum(btf.enumerators("sk_rst_reason").into_iter().flatten())
    };
    let offsets = KernelOffsets {
        skc_net: btf
            .member_offset("sock_common", "skc_net.net")
            .unwrap_or(OFFSET_UNKNOWN),
        net_inum: btf
            .member_offset("net", "ns.inum")
            .unwrap_or(OFFSET_UNKNOWN),
        sock_common: SOCK_COMMON_MEMBERS.map(|m| {
            btf.member_offset("sock_common", m)
                .unwrap_or(OFFSET_UNKNOWN)
        }),
        sk_protocol: btf
            .member_offset("sock", "sk_protocol")
            .unwrap_or(OFFSET_UNKNOWN),
        inet_sport: btf
            .member_offset("inet_sock", "inet_sport")
            .unwrap_or(OFFSET_UNKNOWN),
        rst_reason,
    };
    Ok(KernelBtf {
        offsets,
        reset_reasons,
    })
}

const KIND_STRUCT: u32 = 4;
const KIND_ENUM: u32 = 6;
const KIND_ENUM64: u32 = 19;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: u32,
    /// `size` or `type`, depending on the kind.
    size_type: u32,
    /// Byte offset of the trailing data (members) in the type section.
    extra: usize,
}

/// Just enough of a BTF blob to resolve struct member offsets.
pub struct Btf<'a> {
    types: Vec<Type>, // index = type id; id 0 is void
    type_section: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        let magic = data.get(0..2).map(|m| u16::from_le_bytes([m[0], m[1]]));
        if magic != Some(BTF_MAGIC) {
            return Err(BtfError::BadHeader);
        }
        let h = |i: usize| {
            u32_at(data, 4 + 4 * i)
                .ok_or(BtfError::BadHeader)
                .map(|v| v as usize)
        };
        let (hdr_len, type_off, type_len, str_off, str_len) = (h(0)?, h(1)?, h(2)?, h(3)?, h(4)?);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::BadHeader)
        };
        let type_section = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            vlen: 0,
            size_type: 0,
            extra: 0,
        }];
        let mut pos = 0;
        while pos < type_section.len() {
            let word = |i: usize| u32_at(type_section, pos + 4 * i).ok_or(BtfError::Truncated);
            let info = word(1)?;
            let t = Type {
                name_off: word(0)?,
                kind: (info >> 24) & 0x1f,
                kind_flag: info >> 31 == 1,
                vlen: info & 0xffff,
                size_type: word(2)?,
                extra: pos + 12,
            };
            let vlen = t.vlen as usize;
            let extra = match t.kind {
                1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
                3 => 12,                   // ARRAY
                4 | 5 => 12 * vlen,        // STRUCT, UNION
                6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
                15 | 19 => 12 * vlen,      // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, ..., FLOAT, TYPE_TAG
                k => return Err(BtfError::UnknownKind(k)),
            };
            pos = t.extra + extra;
            if pos > type_section.len() {
                return Err(BtfError::Truncated);
            }
            types.push(t);
        }
        Ok(Btf {
            types,
            type_section,
            strings,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_type;
                }
                _ => break,
            }
        }
        id
    }

    /// (name_off, type id, bit offset) of each member of a struct/union.
    fn members(&self, id: u32) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        let t = self.types.get(id as usize).copied();
        let (n, base, bitfields) = match t {
            Some(t) if matches!(t.kind, KIND_STRUCT | KIND_UNION) => {
                (t.vlen as usize, t.extra, t.kind_flag)
            }
            _ => (0, 0, false),
        };
        (0..n).filter_map(move |i| {
            let m = base + 12 * i;
            let off = u32_at(self.type_section, m + 8)?;
            Some((
                u32_at(self.type_section, m)?,
                u32_at(self.type_section, m + 4)?,
                if bitfields { off & 0xff_ffff } else { off },
            ))
        })
    }

    /// Bit offset of member `name` in struct/union `id`, looking into
    /// anonymous members too; returns the member's type id.
    fn find_member(&self, id: u32, name: &[u8]) -> Option<(u32, u32)> {
        for (name_off, ty, bits) in self.members(id) {
            if name_off == 0 {
                if let Some((t, inner)) = self.find_member(self.resolve(ty), name) {
                    return Some((t, bits + inner));
                }
            } else if self.name(name_off) == name {
                return Some((ty, bits));
            }
        }
        None
    }

    /// The (name, value) of each enumerator of `enum type_name` (values
    /// past `u32` are left out: none is used as one).
    pub fn enumerators(&self, type_name: &str) -> Option<Vec<(&'a str, u32)>> {
        let t = self.types.iter().copied().find(|t| {
            matches!(t.kind, KIND_ENUM | KIND_ENUM64)
                && self.name(t.name_off) == type_name.as_bytes()
        })?;
        let entry = if t.kind == KIND_ENUM { 8 } else { 12 };
        let mut out = Vec::with_capacity(t.vlen as usize);
        for i in 0..t.vlen as usize {
            let at = t.extra + entry * i;
            let name_off = u32_at(self.type_section, at)?;
            let lo = u32_at(self.type_section, at + 4)?;
            let hi = if t.kind == KIND_ENUM64 {
                u32_at(self.type_section, at + 8)?
            } else {
                0
            };
            let strings: &'a [u8] = self.strings;
            let rest = strings.get(name_off as usize..).unwrap_or(&[]);
            let name = &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())];
            if let (0, Ok(name)) = (hi, std::str::from_utf8(name)) {
                out.push((name, lo));
            }
        }
        Some(out)
    }

    /// Byte offset of `path` (`a.b.c`) inside `struct type_name`.
    pub fn member_offset(&self, type_name: &str, path: &str) -> Option<u32> {
        let mut id = (1..self.types.len() as u32).find(|&i| {
            let t = self.types[i as usize];
            t.kind == KIND_STRUCT && self.name(t.name_off) == type_name.as_bytes()
        })?;
        let mut bits = 0;
        for part in path.split('.') {
            let (ty, off) = self.find_member(self.resolve(id), part.as_bytes())?;
            bits += off;
            id = ty;
        }
        (bits % 8 == 0).then_some(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: `struct inner { int a; int b; }` and
    /// `struct outer { long x; union { int y; }; typedef-of-inner t; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0outer\0x\0y\0t\0inner_t\0".to_vec();
        let s = |name: &str| {
            strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            words
                .iter()
                .for_each(|w| types.extend_from_slice(&w.to_le_bytes()));
        };
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        push(&[s("int"), info(1, 0), 4, 32]); // 1: int
        push(&[s("inner"), info(4, 2), 8, s("a"), 1, 0, s("b"), 1, 32]); // 2: struct inner
        push(&[0, info(5, 1), 4, s("y"), 1, 0]); // 3: anonymous union { int y; }
        push(&[s("inner_t"), info(8, 0), 2]); // 4: typedef inner inner_t
        push(&[
            s("outer"),
            info(4, 3),
            24,
            s("x"),
            1,
            0,
            0,
            3,
            64,
            s("t"),
            4,
            128,
        ]); // 5: outer
        let mut data = Vec::new();
        data.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn member_offsets_through_typedefs_and_anonymous_unions() {
        let data = blob();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.member_offset("outer", "x"), Some(0));
        assert_eq!(btf.member_offset("outer", "y"), Some(8));
        assert_eq!(btf.member_offset("outer", "t.b"), Some(20));
        assert_eq!(btf.member_offset("inner", "b"), Some(4));
        assert_eq!(btf.member_offset("outer", "nope"), None);
        assert_eq!(btf.member_offset("missing", "x"), None);
    }

    #[test]
    fn bad_data_is_an_error_not_a_panic() {
        assert_eq!(Btf::parse(b"").err(), Some(BtfError::BadHeader));
        let mut data = blob();
        data.truncate(40);
        assert!(Btf::parse(&data).is_err());
        let mut data = blob();
        data[24 + 7] = 30; // kind 30 in the first type's info
        assert_eq!(Btf::parse(&data).err(), Some(BtfError::UnknownKind(30)));
    }

    #[test]
    fn agrees_with_btfparse_on_the_running_kernel() {
        let Ok(data) = std::fs::read(VMLINUX_BTF) else {
            panic!("{VMLINUX_BTF} is needed (every kernel the suite runs on has BTF)");
        };
        let ours = Btf::parse(&data).unwrap();
        struct Bytes<'a>(&'a [u8]);
        impl btfparse::Readable for Bytes<'_> {
            fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
                let start = offset as usize;
                let src = self
                    .0
                    .get(start..start + buffer.len())
                    .ok_or_else(|| btfparse::Error::new(btfparse::ErrorKind::IOError, "eof"))?;
                buffer.copy_from_slice(src);
                Ok(())
            }
        }
        let theirs = btfparse::TypeInformation::new(&Bytes(&data)).unwrap();
        for (ty, path) in [
            ("sock_common", "skc_net.net"),
            ("net", "ns.inum"),
            ("sock_common", "skc_state"),
            ("sock_common", "skc_dport"),
            ("sock_common", "skc_v6_daddr"),
            ("sock_common", "skc_rcv_saddr"),
            ("sock", "sk_socket"),
            ("sock", "sk_protocol"),
            ("inet_sock", "inet_sport"),
            ("inet_timewait_sock", "tw_timer"),
            ("tcp_sock", "srtt_us"),
        ] {
            let expected = match theirs.offset_of(theirs.id_of(ty).unwrap(), path).unwrap().1 {
                btfparse::Offset::ByteOffset(o) => Some(o),
                _ => None,
            };
            assert_eq!(ours.member_offset(ty, path), expected, "{ty}.{path}");
        }
    }
}
