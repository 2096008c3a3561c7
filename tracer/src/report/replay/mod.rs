//! `tracer summarize FILE`: the summary of a recording made with
//! `--output json`, computed by the code the live agent uses.
//!
//! Transition records are parsed back into a [`Transition`] and the owner
//! the record names (its `pid`, `comm`, `uid`), the very pair the live
//! agent gave its [`Observers`] when it wrote the record, and fed to the
//! same [`Summary`]: a recording gives the summary the live run printed
//! (transitions the agent derived, TIME_WAIT's, included). If the recording
//! holds no transition records, the `states` of its connection records are
//! used instead; when it holds both, only transitions count (the same stays
//! would otherwise be counted twice).

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
    kernel::events::{Comm, Family, Source, TcpState, Transition},
    report::format::Format,
    report::group::{GroupBy, NamedOwner},
    report::observe::{key_of, Observers},
    report::summary::Summary,
    track::close::{CloseBy, Rst},
    track::tracker::{Owner, TimewaitEnd, TupleKey},
};

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
    /// Connection records written at exit (`at_exit`), left out.
    pub cut_at_exit: u64,
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
    if read.cut_at_exit > 0 {
        note.push_str(&format!(
            " ({} written at exit, left out as the live summary does)",
            read.cut_at_exit
        ));
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
    // The live agent's observers, summary only.
    let mut observers = Observers::new(Some(Summary::new(group_by, top)), None);

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
        let rec: RecordedLine = match serde_json::from_str(text) {
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
                let (t, owner) = rec
                    .transition()
                    .map_err(|e| anyhow!("{name}:{n}: bad transition record: {e}"))?;
                read.transitions += 1;
                observers.transition(&t, &owner, None);
            }
            "connection" => {
                read.connections += 1;
                // Written at exit, not counted by the live summary either.
                if rec.at_exit == Some(true) {
                    read.cut_at_exit += 1;
                    continue;
                }
                let c = rec
                    .connection()
                    .map_err(|e| anyhow!("{name}:{n}: bad connection record: {e}"))?;
                if read.transitions == 0 {
                    connections.push(c);
                } else {
                    // As the live agent does when it writes the record.
                    observers.timewait_ended(&c.key, c.time_wait_end, c.owner.as_ref());
                    if let Some((by, rst)) = c.close {
                        observers.closed(&c.key, by, rst, c.owner.as_ref());
                    }
                }
            }
            _ => read.other += 1,
        }
    };
    result?;
    let mut summary = observers.summary.take().expect("set above");

    if read.transitions > 0 {
        read.connections_ignored = read.connections;
    } else {
        for c in &connections {
            for &(state, ns) in &c.states {
                summary.record(state, ns, |by| {
                    by.key_of(c.lport, c.rport, c.raddr, c.owner.as_ref())
                });
            }
            if let Some((by, rst)) = c.close {
                summary.close(by, rst, |g| {
                    g.key_of(c.lport, c.rport, c.raddr, c.owner.as_ref())
                });
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
struct RecordedLine {
    r#type: String,
    mono_ns: Option<u64>,
    /// Null for transitions the agent derived.
    sock: Option<String>,
    /// The owner (null when unknown).
    pid: Option<u32>,
    uid: Option<u32>,
    comm: Option<String>,
    /// The task current when the tracepoint fired.
    task_pid: Option<u32>,
    task_tid: Option<u32>,
    task_comm: Option<String>,
    family: Option<String>,
    laddr: Option<IpAddr>,
    lport: Option<u16>,
    raddr: Option<IpAddr>,
    rport: Option<u16>,
    old: Option<String>,
    new: Option<String>,
    old_state_ns: Option<u64>,
    netns: Option<u32>,
    /// The owner's cgroup path and container (recordings from before
    /// them have none).
    cgroup: Option<String>,
    container: Option<ContainerRecord>,
    source: Option<String>,
    states: Option<BTreeMap<String, u64>>,
    time_wait_end: Option<String>,
    /// How a connection closed (recordings from before the close classes
    /// have none).
    close: Option<CloseRecord>,
    /// Connection records written when the tracer stopped.
    at_exit: Option<bool>,
}

#[derive(Deserialize)]
struct ContainerRecord {
    id: String,
    runtime: String,
}

#[derive(Deserialize)]
struct CloseRecord {
    by: String,
    rst: Option<RstRecord>,
}

#[derive(Deserialize)]
struct RstRecord {
    sent: u32,
    received: u32,
}

/// The stays of one connection record.
struct ConnectionStays {
    key: TupleKey,
    time_wait_end: Option<TimewaitEnd>,
    owner: Option<NamedOwner>,
    lport: u16,
    rport: u16,
    raddr: IpAddr,
    states: Vec<(TcpState, u64)>,
    close: Option<(CloseBy, Option<Rst>)>,
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

/// Every [`Source`] (the test `every_source_is_read_back` keeps it whole).
const SOURCES: [Source; 4] = [
    Source::Tracepoint,
    Source::SockDiag,
    Source::Reuse,
    Source::Fentry,
];

fn family(name: &str) -> anyhow::Result<Family> {
    match name {
        "ipv4" => Ok(Family::Ipv4),
        "ipv6" => Ok(Family::Ipv6),
        other => bail!("unknown family `{other}`"),
    }
}

fn comm(s: &str) -> Comm {
    let mut raw = [0u8; 16];
    let n = s.len().min(16);
    raw[..n].copy_from_slice(&s.as_bytes()[..n]);
    Comm::new(raw)
}

impl RecordedLine {
    /// The owner the record names: `pid` and `comm` (both null when
    /// unknown; `pid` alone when only the comm is known).
    fn owner(&self) -> Option<NamedOwner> {
        let owner = Owner {
            pid: self.pid.unwrap_or(0),
            comm: comm(self.comm.as_deref()?),
            uid: self.uid.unwrap_or(0),
            // As `--group-by cgroup` keys them live: a number per path.
            cgroup: self
                .cgroup
                .as_deref()
                .map_or(0, crate::track::containers::id_for_label),
        };
        Some(NamedOwner {
            owner,
            container: self
                .container
                .as_ref()
                .and_then(|c| crate::track::containers::key_of(&c.id, &c.runtime)),
        })
    }

    fn transition(&self) -> anyhow::Result<(Transition, Option<NamedOwner>)> {
        let sock = match self.sock.as_deref() {
            Some(s) => u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .map_err(|_| anyhow!("`sock` {s:?} is not a hex address"))?,
            None => 0,
        };
        let family = family(need(self.family.as_deref(), "family")?)?;
        let source = match self.source.as_deref() {
            None => Source::Tracepoint,
            Some(name) => SOURCES
                .into_iter()
                .find(|s| s.name() == name)
                .ok_or_else(|| anyhow!("unknown source `{name}`"))?,
        };
        let t = Transition {
            mono_ns: need(self.mono_ns, "mono_ns")?,
            sock,
            task: self.task_pid.is_some(),
            pid: self.task_pid.unwrap_or(0),
            tid: self.task_tid.unwrap_or(0),
            uid: 0,
            comm: comm(self.task_comm.as_deref().unwrap_or("")),
            family,
            laddr: need(self.laddr, "laddr")?,
            lport: need(self.lport, "lport")?,
            raddr: need(self.raddr, "raddr")?,
            rport: need(self.rport, "rport")?,
            old: state(need(self.old.as_deref(), "old")?)?,
            new: state(need(self.new.as_deref(), "new")?)?,
            old_state_ns: self.old_state_ns,
            netns: self.netns.unwrap_or(0),
            cgroup: 0,
            source,
        };
        Ok((t, self.owner()))
    }

    fn connection(&self) -> anyhow::Result<ConnectionStays> {
        let states = need(self.states.as_ref(), "states")?
            .iter()
            .map(|(name, &ns)| Ok((state(name)?, ns)))
            .collect::<anyhow::Result<_>>()?;
        let time_wait_end = match self.time_wait_end.as_deref() {
            None => None,
            Some(name) => Some(
                [
                    TimewaitEnd::Expired,
                    TimewaitEnd::Reused,
                    TimewaitEnd::Early,
                    TimewaitEnd::NotCreated,
                    TimewaitEnd::NotFound,
                ]
                .into_iter()
                .find(|e| e.name() == name)
                .ok_or_else(|| anyhow!("unknown time_wait_end `{name}`"))?,
            ),
        };
        Ok(ConnectionStays {
            key: key_of(
                self.netns.unwrap_or(0),
                family(need(self.family.as_deref(), "family")?)?,
                need(self.laddr, "laddr")?,
                need(self.lport, "lport")?,
                need(self.raddr, "raddr")?,
                need(self.rport, "rport")?,
            ),
            time_wait_end,
            owner: self.owner(),
            lport: need(self.lport, "lport")?,
            rport: need(self.rport, "rport")?,
            raddr: need(self.raddr, "raddr")?,
            states,
            close: match &self.close {
                None => None,
                Some(c) => Some((
                    CloseBy::from_name(&c.by)
                        .ok_or_else(|| anyhow!("unknown close class `{}`", c.by))?,
                    c.rst.as_ref().map(|r| Rst {
                        sent: r.sent,
                        received: r.received,
                        // The summary counts resets, not their reasons.
                        reasons: Default::default(),
                    }),
                )),
            },
        })
    }
}

#[cfg(test)]
mod tests;
