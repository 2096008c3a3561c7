//! The close handshake as one line for people (`--events closes`).

use crate::{
    kernel::events::TcpState,
    kernel::reset_reasons::ResetReasons,
    report::summary::duration,
    track::close::{Close, CloseBy},
};

/// The close handshake for people: `local FIN  FIN_WAIT1 40.0µs > FIN_WAIT2
/// 4.40ms > TIME_WAIT 60.0s (expired)`: who closed, then each state the
/// close went through with the time spent in it; resets with the
/// kernel's reasons for those sent, where it gives them: `RST sent
/// (TCP_ABORT_ON_LINGER)`.
pub fn close_summary(c: &Close, time_wait_end: Option<&str>, reasons: &ResetReasons) -> String {
    let mut s = match c.by {
        CloseBy::Local | CloseBy::Peer | CloseBy::Both => format!("{} FIN ", c.by.name()),
        other => format!("{} ", other.name()),
    };
    let steps = &c.handshake;
    let clean = matches!(c.by, CloseBy::Local | CloseBy::Peer | CloseBy::Both);
    if let (false, Some(first)) = (clean, steps.first()) {
        s.push(' ');
        s.push_str(first.old.name());
        s.push_str(" >");
    }
    for (i, step) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        // A clean close's final CLOSE is implied.
        if last && clean && step.new == TcpState::Close {
            break;
        }
        s.push(' ');
        s.push_str(step.new.name());
        if let Some(next) = steps.get(i + 1) {
            s.push(' ');
            s.push_str(&duration(next.at_ns.saturating_sub(step.at_ns)));
        }
        if step.new == TcpState::TimeWait {
            if let Some(end) = time_wait_end {
                s.push_str(&format!(" ({end})"));
            }
        }
        if !last {
            s.push_str(" >");
        }
    }
    if s.ends_with(" >") {
        s.truncate(s.len() - 2);
    }
    if let Some(r) = c.rst {
        if r.sent > 0 {
            s.push_str(&format!("  RST sent{}", count_suffix(r.sent)));
            if reasons.carried && !r.reasons.is_empty() {
                let names: Vec<String> = r
                    .reasons
                    .iter()
                    .map(|(v, _)| reasons.name(v).to_string())
                    .collect();
                s.push_str(&format!(" ({})", names.join(", ")));
            }
        }
        if r.received > 0 {
            s.push_str(&format!("  RST received{}", count_suffix(r.received)));
        }
    }
    s
}

fn count_suffix(n: u32) -> String {
    if n > 1 {
        format!(" x{n}")
    } else {
        String::new()
    }
}
