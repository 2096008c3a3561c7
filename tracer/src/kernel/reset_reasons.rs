//! Why the kernel sent a reset: `enum sk_rst_reason`, which
//! `tcp:tcp_send_reset` carries since Linux 6.10. The names are read from
//! the running kernel's BTF at load time (the enum grows between kernels),
//! without their `SK_RST_REASON_` prefix: `TCP_ABORT_ON_LINGER`.

use std::fmt;

use tracer_common::RESET_REASON_UNREADABLE;

/// Values named at most (the kernel has 26 today): an enum of absurd
/// values must not size the table; the rest are reported as numbers.
const MAX_NAMED: u32 = 1024;
const PREFIX: &str = "SK_RST_REASON_";

/// The kernel's reset reasons, by value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResetReasons {
    /// The kernel's sent resets carry a reason (else nothing is named,
    /// and records have no `reasons`).
    pub carried: bool,
    names: Vec<Option<Box<str>>>,
}

impl ResetReasons {
    /// The table of an `enum sk_rst_reason`'s (name, value) pairs: the
    /// kernel carries reasons.
    pub fn from_enum<'a>(enumerators: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let mut names: Vec<Option<Box<str>>> = Vec::new();
        for (name, value) in enumerators {
            if value >= MAX_NAMED {
                continue;
            }
            let i = value as usize;
            if names.len() <= i {
                names.resize(i + 1, None);
            }
            names[i] = Some(name.strip_prefix(PREFIX).unwrap_or(name).into());
        }
        ResetReasons {
            carried: true,
            names,
        }
    }

    fn known(&self, value: u32) -> Option<&str> {
        self.names.get(value as usize)?.as_deref()
    }

    /// The reason for people and JSON: its name, else its number.
    pub fn name(&self, value: u32) -> ReasonName<'_> {
        ReasonName {
            name: self.known(value),
            value,
        }
    }

    /// The reason as a metric label: its name, else `other` (a label's
    /// values must stay few).
    pub fn label(&self, value: u32) -> &str {
        self.known(value).unwrap_or("other")
    }
}

/// A reason's name, or its number when the kernel's BTF did not name it.
#[derive(Clone, Copy, Debug)]
pub struct ReasonName<'a> {
    name: Option<&'a str>,
    value: u32,
}

impl fmt::Display for ReasonName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name, self.value) {
            (Some(name), _) => f.write_str(name),
            (None, RESET_REASON_UNREADABLE) => f.write_str("unreadable"),
            (None, v) => write!(f, "{v}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The start of the enum as Linux 6.18 has it.
    pub(crate) fn sample() -> ResetReasons {
        ResetReasons::from_enum([
            ("SK_RST_REASON_NOT_SPECIFIED", 0),
            ("SK_RST_REASON_NO_SOCKET", 1),
            ("SK_RST_REASON_TCP_ABORT_ON_CLOSE", 11),
            ("SK_RST_REASON_TCP_ABORT_ON_LINGER", 12),
        ])
    }

    #[test]
    fn names_without_prefix_and_numbers_for_the_unnamed() {
        let r = sample();
        assert!(r.carried);
        assert_eq!(r.name(12).to_string(), "TCP_ABORT_ON_LINGER");
        assert_eq!(r.name(0).to_string(), "NOT_SPECIFIED");
        assert_eq!(r.name(5).to_string(), "5");
        assert_eq!(r.name(40).to_string(), "40");
        assert_eq!(r.name(RESET_REASON_UNREADABLE).to_string(), "unreadable");
        assert_eq!(r.label(11), "TCP_ABORT_ON_CLOSE");
        assert_eq!(r.label(40), "other");
        let absurd = ResetReasons::from_enum([("SK_RST_REASON_FAR", 1 << 30), ("PLAIN", 2)]);
        assert_eq!(absurd.name(1 << 30).to_string(), (1u32 << 30).to_string());
        assert_eq!(absurd.name(2).to_string(), "PLAIN");
        assert!(!ResetReasons::default().carried);
    }

    #[test]
    fn the_running_kernels_enum_when_it_has_one() {
        let Ok(btf) = crate::kernel::btf_offsets::from_sys_fs() else {
            panic!("/sys/kernel/btf/vmlinux is needed (every kernel the suite runs on has BTF)");
        };
        let r = btf.reset_reasons;
        // The record has a reason exactly where the enum is named.
        assert_eq!(
            r.carried,
            btf.offsets.rst_reason != tracer_common::OFFSET_UNKNOWN
        );
        if r.carried {
            assert_eq!(r.name(0).to_string(), "NOT_SPECIFIED");
            assert_eq!(r.name(1).to_string(), "NO_SOCKET");
            assert!((2..32).any(|v| r.name(v).to_string() == "TCP_ABORT_ON_LINGER"));
        }
    }
}
