//! Reading the tracer's JSON Lines output: its final stats record, how many
//! records of each type it printed, and whether every duration is right.
//!
//! A transition's `old_state_ns` is the time since the same socket's
//! previous transition (the kernel program stores the timestamp of each
//! transition and subtracts it at the next), so in a run where the tracer
//! started before any load socket existed it can be checked exactly:
//! - a socket's first transition (`CLOSE -> …` on connect or listen,
//!   `LISTEN -> SYN_RECV` for an accepted socket; the kernel reuses socket
//!   addresses, so every such transition starts a new socket) must have no
//!   duration;
//! - every later one must have exactly `mono_ns - previous mono_ns`.
//!
//! When transitions were lost or skipped, some durations cannot be checked
//! against what was delivered: one shorter than the time since the previous
//! delivered transition (one in between is missing), or any duration of a
//! socket whose first transition is missing. Those are counted apart
//! (`unverifiable`), not as wrong.
//!
//! Transitions the agent derives from sock_diag (TIME_WAIT) are not kernel
//! records and are left out.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    path::Path,
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};
use tracer_common::TcpState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rec {
    pub sock: u64,
    pub mono_ns: u64,
    pub old_state_ns: Option<u64>,
    /// The transition (None: a name the tracer does not print) and the
    /// socket's ports (what a bad one's example names).
    pub old: Option<TcpState>,
    pub new: Option<TcpState>,
    pub lport: u16,
    pub rport: u16,
}

fn state(name: &str) -> Option<TcpState> {
    TcpState::ALL.into_iter().find(|s| s.name() == name)
}

impl Rec {
    fn closes(&self) -> bool {
        self.new == Some(TcpState::Close)
    }

    /// `CLOSE -> …` or `LISTEN -> SYN_RECV`: a new socket's first.
    fn first(&self) -> bool {
        self.old == Some(TcpState::Close)
            || (self.old == Some(TcpState::Listen) && self.new == Some(TcpState::SynRecv))
    }

    /// `port -> port OLD -> NEW at T ns`.
    fn describe(&self) -> String {
        let name = |s: Option<TcpState>| s.map_or("?", TcpState::name);
        format!(
            "{} -> {} {} -> {} at {} ns",
            self.lport,
            self.rport,
            name(self.old),
            name(self.new),
            self.mono_ns
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct DurationCheck {
    pub checked: u64,
    /// A duration where none was possible, or a different one.
    pub wrong: u64,
    /// No duration where the previous transition was delivered.
    pub missing: u64,
    /// Not checkable: a transition before it was not delivered.
    pub unverifiable: u64,
    /// A few of the bad ones, for the JSON report.
    pub examples: Vec<String>,
}

impl DurationCheck {
    pub(super) fn bad(&self) -> u64 {
        self.wrong + self.missing
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "checked": self.checked,
            "wrong": self.wrong,
            "missing": self.missing,
            "unverifiable": self.unverifiable,
            "examples": self.examples,
        })
    }
}

pub(super) fn check_durations(mut recs: Vec<Rec>) -> DurationCheck {
    // Stable: ties keep the order the agent printed them in.
    recs.sort_by_key(|r| (r.sock, r.mono_ns));
    let mut c = DurationCheck::default();
    let mut prev: Option<&Rec> = None;
    for r in &recs {
        c.checked += 1;
        let continues = prev.filter(|p| p.sock == r.sock && !p.closes() && !r.first());
        let bad = match (continues, r.old_state_ns) {
            // A new socket: nothing before it to time.
            (None, None) if r.first() => None,
            (None, Some(_)) if r.first() => {
                c.wrong += 1;
                Some(("wrong", None))
            }
            // Its beginning was not delivered.
            (None, _) => {
                c.unverifiable += 1;
                None
            }
            (Some(p), got) => {
                let e = r.mono_ns - p.mono_ns;
                match got {
                    Some(x) if x == e => None,
                    Some(x) if x < e => {
                        c.unverifiable += 1;
                        None
                    }
                    Some(_) => {
                        c.wrong += 1;
                        Some(("wrong", Some(e)))
                    }
                    None => {
                        c.missing += 1;
                        Some(("missing", Some(e)))
                    }
                }
            }
        };
        if let Some((kind, expected)) = bad {
            if c.examples.len() < 5 {
                // The socket's transition before it names what happened
                // in between.
                let after =
                    continues.map_or_else(String::new, |p| format!(", after {}", p.describe()));
                c.examples.push(format!(
                    "{kind}: sock {:#x}: {}{after}: old_state_ns {:?}, expected {:?}",
                    r.sock,
                    r.describe(),
                    r.old_state_ns,
                    expected
                ));
            }
        }
        prev = Some(r);
    }
    c
}

/// One transition record's fields the check needs (None: not a kernel
/// transition record).
pub(super) fn parse_transition(v: &Value) -> Option<Rec> {
    if v.get("type")?.as_str()? != "transition" {
        return None;
    }
    if v.get("source")
        .and_then(Value::as_str)
        .unwrap_or("tracepoint")
        != "tracepoint"
    {
        return None;
    }
    let sock = v.get("sock")?.as_str()?;
    let sock = u64::from_str_radix(sock.trim_start_matches("0x"), 16).ok()?;
    let old = v.get("old")?.as_str()?;
    let new = v.get("new")?.as_str()?;
    Some(Rec {
        sock,
        mono_ns: v.get("mono_ns")?.as_u64()?,
        old_state_ns: v.get("old_state_ns").and_then(Value::as_u64),
        old: state(old),
        new: state(new),
        lport: port(v, "lport"),
        rport: port(v, "rport"),
    })
}

fn port(v: &Value, key: &str) -> u16 {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0)
}

#[derive(Debug, Default)]
pub(super) struct Scan {
    /// The last `{"type":"stats",...}` record.
    pub stats: Option<Value>,
    pub transitions: u64,
    pub connections: u64,
    pub other: u64,
    pub unparsable: u64,
    pub durations: Option<DurationCheck>,
}

/// Reads the tracer's JSON Lines output.
pub(super) fn scan(path: &Path, check: bool) -> Result<Scan> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = BufReader::with_capacity(1 << 20, f);
    let mut s = Scan::default();
    let mut recs = Vec::new();
    for line in reader.lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.starts_with("{\"type\":\"transition\"") {
            s.transitions += 1;
            if !check {
                continue;
            }
        } else if line.starts_with("{\"type\":\"connection\"") {
            s.connections += 1;
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            s.unparsable += 1;
            continue;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("transition") => recs.extend(parse_transition(&v)),
            Some("stats") => s.stats = Some(v),
            _ => s.other += 1,
        }
    }
    if check {
        s.durations = Some(check_durations(recs));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sock: u64, mono_ns: u64, old: Option<u64>, to_close: bool) -> Rec {
        Rec {
            sock,
            mono_ns,
            old_state_ns: old,
            old: Some(TcpState::Established),
            new: Some(if to_close {
                TcpState::Close
            } else {
                TcpState::Established
            }),
            lport: 0,
            rport: 0,
        }
    }

    fn first(sock: u64, mono_ns: u64, old: Option<u64>) -> Rec {
        Rec {
            old: Some(TcpState::Close),
            new: Some(TcpState::SynSent),
            ..rec(sock, mono_ns, old, false)
        }
    }

    #[test]
    fn exact_durations_pass_in_any_order() {
        let c = check_durations(vec![
            first(2, 105, None),
            first(1, 100, None),
            rec(1, 150, Some(50), false),
            rec(2, 110, Some(5), true),
            rec(1, 151, Some(1), true),
            // Address reused for a new socket after CLOSE.
            first(1, 300, None),
            rec(1, 310, Some(10), false),
            // ... and again, its CLOSE never delivered (skipped).
            first(1, 400, None),
        ]);
        assert_eq!(c.checked, 8);
        assert_eq!((c.bad(), c.unverifiable), (0, 0), "{:?}", c.examples);
    }

    #[test]
    fn wrong_missing_and_stale_durations_are_counted() {
        let c = check_durations(vec![
            first(1, 100, None),
            rec(1, 150, Some(51), false), // wrong: longer than possible
            rec(1, 160, None, true),      // missing
            first(1, 300, Some(7)),       // stale: a new socket has none
            rec(1, 350, Some(20), false), // one in between not delivered
            rec(2, 500, Some(3), false),  // its beginning not delivered
        ]);
        assert_eq!((c.wrong, c.missing, c.unverifiable), (2, 1, 2));
        assert_eq!(c.examples.len(), 3);
        assert_eq!(
            c.examples[1],
            "missing: sock 0x1: 0 -> 0 ESTABLISHED -> CLOSE at 160 ns, after 0 -> 0 \
             ESTABLISHED -> ESTABLISHED at 150 ns: old_state_ns None, expected Some(10)"
        );
    }

    #[test]
    fn parses_the_tracer_records() {
        let line = r#"{"type":"transition","time":"2026-11-23T21:05:35.735895066Z","mono_ns":3140688563289,"sock":"0xffff888104e60940","pid":1,"comm":"x","uid":0,"family":"ipv4","laddr":"127.0.0.1","lport":1,"raddr":"127.0.0.1","rport":2,"old":"FIN_WAIT2","new":"CLOSE","old_state_ns":4411390,"netns":1,"source":"tracepoint"}"#;
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            parse_transition(&v),
            Some(Rec {
                old: Some(TcpState::FinWait2),
                lport: 1,
                rport: 2,
                ..rec(0xffff888104e60940, 3140688563289, Some(4411390), true)
            })
        );
        assert_eq!(state("NOT_A_STATE"), None);
        let connect = line
            .replace("\"old\":\"FIN_WAIT2\"", "\"old\":\"CLOSE\"")
            .replace("\"new\":\"CLOSE\"", "\"new\":\"SYN_SENT\"");
        assert!(parse_transition(&serde_json::from_str(&connect).unwrap())
            .unwrap()
            .first());
        let derived = line.replace("\"source\":\"tracepoint\"", "\"source\":\"sock_diag\"");
        assert_eq!(
            parse_transition(&serde_json::from_str(&derived).unwrap()),
            None
        );
        let unknown = line.replace("\"old_state_ns\":4411390", "\"old_state_ns\":null");
        assert_eq!(
            parse_transition(&serde_json::from_str(&unknown).unwrap())
                .unwrap()
                .old_state_ns,
            None
        );
    }

    #[test]
    fn scans_a_file() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"type":"transition","mono_ns":10,"sock":"0x1","old":"CLOSE","new":"SYN_SENT","old_state_ns":null,"source":"tracepoint"}"#,
                "\n",
                r#"{"type":"transition","mono_ns":15,"sock":"0x1","old":"SYN_SENT","new":"ESTABLISHED","old_state_ns":5,"source":"tracepoint"}"#,
                "\n",
                r#"{"type":"connection","sock":"0x1"}"#,
                "\n",
                r#"{"type":"stats","events":2,"lost":0}"#,
                "\n"
            ),
        )
        .unwrap();
        let s = scan(&p, true).unwrap();
        assert_eq!((s.transitions, s.connections), (2, 1));
        assert_eq!(s.stats.unwrap()["events"], 2);
        assert_eq!(s.durations.unwrap().bad(), 0);
        let s = scan(&p, false).unwrap();
        assert!(s.durations.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
