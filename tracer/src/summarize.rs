//! `tracer summarize FILE`: the summary of a recording made with
//! `--output json`, computed by the code the live agent uses.
//!
//! Transition records are parsed back into [`Transition`]s and replayed
//! through a [`Pipeline`] (tracker included, for owners) whose output goes
//! nowhere, so a recording gives the summary the live run printed. If the
//! recording holds no transition records, the `states` of its connection
//! records are used instead; when it holds both, only transitions count
//! (the same stays would otherwise be counted twice).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, Write},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;

use crate::{
    agent::Pipeline,
    cli::{EventsMode, Format},
    clock::WallClock,
    events::{Comm, Family, TcpState, Transition},
    group::{GroupBy, Owner},
    observe::Observers,
    output::Output,
    summary::Summary,
    tracker::Tracker,
};

/// Sockets followed at once during the replay: the live default.
const REPLAY_SOCKETS: usize = 65536;

#[derive(Debug, Clone, clap::Args)]
pub struct SummarizeArgs {
    /// JSON Lines written by `tracer --output json`, or - for stdin.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,

    /// Split the summary by this field (the owner's, for comm and pid).
    #[arg(long, value_enum, value_name = "FIELD")]
    pub group_by: Option<GroupBy>,

    /// With --group-by: the number of groups shown, by count; the rest are
    /// summed in one "other" group.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000), requires = "group_by")]
    pub top: u32,
}

/// What a recording held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub transitions: u64,
    pub connections: u64,
    /// Records of other types (stats, summary, ...), skipped.
    pub other: u64,
    /// Connection records left out because transitions were present.
    pub connections_ignored: u64,
}

pub fn run(args: &SummarizeArgs) -> anyhow::Result<()> {
    let (name, input): (String, Box<dyn BufRead>) = if args.file.as_os_str() == "-" {
        ("stdin".into(), Box::new(io::stdin().lock()))
    } else {
        let name = args.file.display().to_string();
        let f = File::open(&args.file).with_context(|| format!("cannot open {name}"))?;
        (name, Box::new(BufReader::with_capacity(256 << 10, f)))
    };
    let (summary, read) = summarize(input, &name, args.group_by, args.top as usize)?;
    let mut note = format!(
        "tracer: {name}: {} transition records, {} connection records",
        read.transitions, read.connections
    );
    if read.connections_ignored > 0 {
        note.push_str(" (summarized from the transitions)");
    }
    note.push_str(&format!("; {} stays of known duration", summary.stays()));
    eprintln!("{note}");

    let mut out = BufWriter::new(io::stdout().lock());
    match summary
        .write(&mut out, args.output)
        .and_then(|()| out.flush())
    {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the summary"),
    }
}

/// The summary of every record of `input` (JSON Lines); `name` is for
/// error messages.
pub fn summarize<R: BufRead>(
    mut input: R,
    name: &str,
    group_by: Option<GroupBy>,
    top: usize,
) -> anyhow::Result<(Summary, Read)> {
    let mut pipeline = Pipeline {
        tracker: Tracker::new(REPLAY_SOCKETS),
        out: Output::new(
            io::sink(),
            Format::Json,
            EventsMode::None,
            WallClock::with_offset_ns(0),
        ),
        events: 0,
        unreadable: 0,
        observers: Observers {
            summary: Some(Summary::new(group_by, top)),
            metrics: None,
        },
    };

    let mut read = Read::default();
    let mut connections: Vec<ConnectionStays> = Vec::new();
    let mut line = String::new();
    let mut n = 0u64;
    let result = loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(anyhow!(e).context(format!("reading {name}"))),
        }
        n += 1;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let rec: Record = match serde_json::from_str(text) {
            Ok(r) => r,
            // Another record type whose fields are not those of ours.
            Err(_) if matches!(serde_json::from_str::<TypeOnly>(text), Ok(t) if !ours(&t.r#type)) =>
            {
                read.other += 1;
                continue;
            }
            // A recording cut short (tracer killed, disk full) ends in a
            // partial line: skip it.
            Err(_) if !line.ends_with('\n') && n > 1 => {
                eprintln!("tracer: {name}:{n}: incomplete last line, skipped");
                break Ok(());
            }
            Err(e) => {
                break Err(anyhow!(
                    "{name}:{n}: not a tracer JSON record ({e}); summarize reads what \
                     `tracer --output json` writes"
                ))
            }
        };
        match rec.r#type.as_str() {
            "transition" => {
                let t = rec
                    .transition()
                    .map_err(|e| anyhow!("{name}:{n}: bad transition record: {e}"))?;
                read.transitions += 1;
                pipeline
                    .on_transition(&t)
                    .expect("writing to io::sink cannot fail");
            }
            "connection" => {
                read.connections += 1;
                if read.transitions == 0 {
                    connections.push(
                        rec.connection()
                            .map_err(|e| anyhow!("{name}:{n}: bad connection record: {e}"))?,
                    );
                }
            }
            _ => read.other += 1,
        }
    };
    result?;
    let mut summary = pipeline.observers.summary.take().expect("set above");

    if read.transitions > 0 {
        read.connections_ignored = read.connections;
    } else {
        for c in &connections {
            let owner = || Owner {
                pid: c.pid,
                comm: c.comm,
            };
            for &(state, ns) in &c.states {
                summary.record(state, ns, |by| by.key_of(c.lport, c.rport, c.raddr, owner));
            }
        }
    }
    Ok((summary, read))
}

#[derive(Deserialize)]
struct TypeOnly {
    r#type: String,
}

fn ours(ty: &str) -> bool {
    ty == "transition" || ty == "connection"
}

/// Any record; the fields of the transition and connection records are
/// checked when they are used.
#[derive(Deserialize)]
struct Record {
    r#type: String,
    mono_ns: Option<u64>,
    sock: Option<String>,
    pid: Option<u32>,
    tid: Option<u32>,
    uid: Option<u32>,
    comm: Option<String>,
    family: Option<String>,
    laddr: Option<IpAddr>,
    lport: Option<u16>,
    raddr: Option<IpAddr>,
    rport: Option<u16>,
    old: Option<String>,
    new: Option<String>,
    old_state_ns: Option<u64>,
    states: Option<BTreeMap<String, u64>>,
}

/// The stays of one connection record.
struct ConnectionStays {
    pid: u32,
    comm: Comm,
    lport: u16,
    rport: u16,
    raddr: IpAddr,
    states: Vec<(TcpState, u64)>,
}

fn need<T>(v: Option<T>, field: &str) -> anyhow::Result<T> {
    v.ok_or_else(|| anyhow!("no `{field}`"))
}

fn state(name: &str) -> anyhow::Result<TcpState> {
    TcpState::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| anyhow!("unknown TCP state `{name}`"))
}

fn comm(s: &str) -> Comm {
    let mut raw = [0u8; 16];
    let n = s.len().min(16);
    raw[..n].copy_from_slice(&s.as_bytes()[..n]);
    Comm::new(raw)
}

impl Record {
    fn transition(&self) -> anyhow::Result<Transition> {
        let sock = need(self.sock.as_deref(), "sock")?;
        let sock = u64::from_str_radix(sock.trim_start_matches("0x"), 16)
            .map_err(|_| anyhow!("`sock` {sock:?} is not a hex address"))?;
        let family = match need(self.family.as_deref(), "family")? {
            "ipv4" => Family::Ipv4,
            "ipv6" => Family::Ipv6,
            other => bail!("unknown family `{other}`"),
        };
        Ok(Transition {
            mono_ns: need(self.mono_ns, "mono_ns")?,
            sock,
            pid: need(self.pid, "pid")?,
            tid: self.tid.unwrap_or(0),
            uid: self.uid.unwrap_or(0),
            comm: comm(need(self.comm.as_deref(), "comm")?),
            family,
            laddr: need(self.laddr, "laddr")?,
            lport: need(self.lport, "lport")?,
            raddr: need(self.raddr, "raddr")?,
            rport: need(self.rport, "rport")?,
            old: state(need(self.old.as_deref(), "old")?)?,
            new: state(need(self.new.as_deref(), "new")?)?,
            old_state_ns: self.old_state_ns,
        })
    }

    fn connection(&self) -> anyhow::Result<ConnectionStays> {
        let states = need(self.states.as_ref(), "states")?
            .iter()
            .map(|(name, &ns)| Ok((state(name)?, ns)))
            .collect::<anyhow::Result<_>>()?;
        Ok(ConnectionStays {
            pid: need(self.pid, "pid")?,
            comm: comm(need(self.comm.as_deref(), "comm")?),
            lport: need(self.lport, "lport")?,
            rport: need(self.rport, "rport")?,
            raddr: need(self.raddr, "raddr")?,
            states,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::tests::{comm as c, sample},
        summary::SummaryArgs,
    };
    use TcpState::*;

    const MS: u64 = 1_000_000;

    /// One client connection's life on port 80, and one server child's.
    fn traffic() -> Vec<Transition> {
        let client = |ms: u64, old, new, known: Option<u64>| Transition {
            mono_ns: ms * MS,
            sock: 1,
            old,
            new,
            old_state_ns: known.map(|k| k * MS),
            pid: 10,
            comm: c("curl"),
            ..sample()
        };
        let server = |ms: u64, old, new, known: Option<u64>| Transition {
            mono_ns: ms * MS,
            sock: 2,
            old,
            new,
            old_state_ns: known.map(|k| k * MS),
            pid: 0,
            comm: c("swapper/0"),
            lport: 80,
            rport: 43210,
            ..sample()
        };
        vec![
            client(100, Close, SynSent, None),
            server(101, Listen, SynRecv, None),
            client(102, SynSent, Established, Some(2)),
            server(103, SynRecv, Established, Some(2)),
            client(303, Established, FinWait1, Some(201)),
            server(304, Established, CloseWait, Some(201)),
            client(305, FinWait1, FinWait2, Some(2)),
            Transition {
                pid: 20,
                comm: c("nginx"),
                ..server(354, CloseWait, LastAck, Some(50))
            },
            server(355, LastAck, Close, Some(1)),
            client(356, FinWait2, Close, Some(51)),
        ]
    }

    /// The JSON Lines the live agent writes for `events`, with --summary.
    fn recording(events: &[Transition], mode: EventsMode, by: Option<GroupBy>) -> (String, String) {
        let args = SummaryArgs {
            summary: true,
            group_by: by,
            top: 10,
        };
        let mut p = Pipeline {
            tracker: Tracker::new(64),
            out: Output::new(Vec::new(), Format::Json, mode, WallClock::with_offset_ns(0)),
            events: 0,
            unreadable: 0,
            observers: Observers {
                summary: Summary::from_args(&args),
                metrics: None,
            },
        };
        for t in events {
            p.on_transition(t).unwrap();
        }
        let mut live = Vec::new();
        p.observers
            .summary
            .as_ref()
            .unwrap()
            .write_json(&mut live)
            .unwrap();
        let rec = String::from_utf8(p.out.into_inner()).unwrap();
        (rec, String::from_utf8(live).unwrap())
    }

    fn replay(rec: &str, by: Option<GroupBy>) -> (Read, String) {
        let (s, read) = summarize(rec.as_bytes(), "test", by, 10).unwrap();
        let mut out = Vec::new();
        s.write_json(&mut out).unwrap();
        (read, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_recording_gives_the_live_summary() {
        for by in [
            None,
            Some(GroupBy::Lport),
            Some(GroupBy::Comm),
            Some(GroupBy::Pid),
            Some(GroupBy::Raddr),
        ] {
            let (rec, live) = recording(&traffic(), EventsMode::All, by);
            let (read, replayed) = replay(&rec, by);
            assert_eq!(replayed, live, "{by:?}");
            assert_eq!(read.transitions, 10);
            assert_eq!(read.connections, 2);
            assert_eq!(read.connections_ignored, 2, "transitions are preferred");
        }
    }

    #[test]
    fn comm_groups_follow_the_trackers_owner() {
        let (rec, live) = recording(&traffic(), EventsMode::Transitions, Some(GroupBy::Comm));
        let groups: Vec<serde_json::Value> = live
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let of = |comm: &str| {
            groups
                .iter()
                .find(|g| g["group"]["value"] == comm)
                .unwrap_or_else(|| panic!("no {comm} group in {live}"))["states"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
        };
        let set = |names: &[&str]| -> std::collections::BTreeSet<String> {
            names.iter().map(|n| n.to_string()).collect()
        };
        // The client's owner is known from its connect(): every stay is
        // curl's, even those that ended in softirq on another task.
        assert_eq!(
            of("curl"),
            set(&["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"])
        );
        // The server child's is only known at CLOSE_WAIT -> LAST_ACK (its
        // owner's close); before that it is the task of its first transition.
        assert_eq!(of("swapper/0"), set(&["SYN_RECV", "ESTABLISHED"]));
        assert_eq!(of("nginx"), set(&["CLOSE_WAIT", "LAST_ACK"]));
        assert_eq!(replay(&rec, Some(GroupBy::Comm)).1, live);
    }

    #[test]
    fn connection_records_alone_are_used() {
        let (rec, _) = recording(&traffic(), EventsMode::Connections, None);
        let (read, out) = replay(&rec, None);
        assert_eq!(read.transitions, 0);
        assert_eq!(read.connections, 2);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["states"]["ESTABLISHED"]["count"], 2);
        assert_eq!(v["states"]["ESTABLISHED"]["max_ns"], 201 * MS);
        assert_eq!(v["states"]["CLOSE_WAIT"]["count"], 1);
        // Owners of connection records.
        let (_, by_comm) = replay(&rec, Some(GroupBy::Comm));
        assert!(by_comm.contains(r#""value":"nginx""#), "{by_comm}");
        assert!(by_comm.contains(r#""value":"curl""#), "{by_comm}");
    }

    #[test]
    fn other_records_and_blank_lines_are_skipped() {
        let (rec, live) = recording(&traffic(), EventsMode::Transitions, None);
        let rec = format!(
            "\n{rec}{live}{}\n",
            r#"{"type":"stats","events":10,"lost":0}"#
        );
        let (read, out) = replay(&rec, None);
        assert_eq!(read.other, 2);
        assert_eq!(out, live);
    }

    #[test]
    fn errors_name_the_line() {
        let err = summarize(
            "{\"type\":\"stats\"}\nTIME(UTC) PID COMM\n".as_bytes(),
            "cap.json",
            None,
            10,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("cap.json:2: not a tracer JSON record"),
            "{err}"
        );
        let err = summarize(
            r#"{"type":"transition","sock":"0x1"}"#.as_bytes(),
            "x",
            None,
            10,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("x:1: bad transition record: no `family`"),
            "{err}"
        );
        let (rec, _) = recording(&traffic(), EventsMode::Transitions, None);
        let bad = rec.replacen("\"ESTABLISHED\"", "\"ESTABLISHD\"", 1);
        let err = summarize(bad.as_bytes(), "x", None, 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown TCP state `ESTABLISHD`"), "{err}");
    }

    #[test]
    fn a_cut_last_line_is_skipped() {
        let (rec, live) = recording(&traffic(), EventsMode::Transitions, None);
        let cut = format!("{rec}{{\"type\":\"transition\",\"mono");
        let (read, out) = replay(&cut, None);
        assert_eq!(read.transitions, 10);
        assert_eq!(out, live);
    }

    #[test]
    fn subcommand_and_flags() {
        use crate::cli::{Args, Command};
        use clap::{error::ErrorKind, Parser as _};
        let parse =
            |a: &[&str]| Args::try_parse_from(std::iter::once("tracer").chain(a.iter().copied()));
        let a = parse(&[
            "summarize",
            "cap.json",
            "-o",
            "json",
            "--group-by",
            "rport",
            "--top",
            "5",
        ])
        .unwrap();
        let Some(Command::Summarize(s)) = a.command else {
            panic!("no subcommand")
        };
        assert_eq!(s.file, PathBuf::from("cap.json"));
        assert_eq!(s.output, Format::Json);
        assert_eq!(s.group_by, Some(GroupBy::Rport));
        assert_eq!(s.top, 5);
        assert!(parse(&["--port", "80"]).unwrap().command.is_none());
        assert_eq!(
            parse(&["summarize"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse(&["summarize", "-", "--group-by", "bogus"])
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse(&["--port", "80", "summarize", "-"])
                .unwrap_err()
                .kind(),
            ErrorKind::ArgumentConflict
        );
    }
}
