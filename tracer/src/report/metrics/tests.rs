//! Unit tests of `metrics` (no root needed).
use super::*;
use crate::kernel::events::tests::{comm, sample};
use TcpState::*;

fn tr(sock: u64, old: TcpState, new: TcpState, ns: Option<u64>) -> Transition {
    Transition {
        sock,
        old,
        new,
        old_state_ns: ns,
        ..sample()
    }
}

fn curl() -> NamedOwner {
    NamedOwner::from(crate::track::tracker::Owner {
        pid: 1,
        comm: comm("curl"),
        uid: 0,
        ..Default::default()
    })
}

/// The value of the series `name{labels}` in `text`, labels given as
/// they appear.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[test]
fn listen_addresses() {
    assert_eq!(
        parse_listen_addr("9975").unwrap(),
        "127.0.0.1:9975".parse().unwrap()
    );
    assert_eq!(
        parse_listen_addr("0.0.0.0:80").unwrap(),
        "0.0.0.0:80".parse().unwrap()
    );
    assert_eq!(
        parse_listen_addr("[::1]:9975").unwrap(),
        "[::1]:9975".parse().unwrap()
    );
    for bad in ["notanaddr", "localhost:9975", "1.2.3.4", "99999", ""] {
        assert!(parse_listen_addr(bad).is_err(), "{bad}");
    }
}

#[test]
fn metrics_flags() {
    use clap::{error::ErrorKind, Parser as _};
    let parse = |a: &[&str]| {
        crate::cli::Args::try_parse_from(std::iter::once("tracer").chain(a.iter().copied()))
    };
    let a = parse(&[]).unwrap();
    assert!(Recorder::from_args(&a.metrics, a.close_wait).is_none());
    let a = parse(&[
        "--metrics",
        "9975",
        "--events",
        "none",
        "--metrics-label",
        "comm",
        "--metrics-label-max",
        "5",
    ])
    .unwrap();
    assert_eq!(a.metrics.metrics, Some("127.0.0.1:9975".parse().unwrap()));
    assert_eq!(a.metrics.metrics_label, Some(MetricsLabel::Comm));
    assert_eq!(a.metrics.metrics_label_max, 5);
    assert_eq!(
        parse(&["--metrics", "notanaddr"]).unwrap_err().kind(),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        parse(&["--metrics-label", "lport"]).unwrap_err().kind(),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        parse(&["--metrics", "1", "--metrics-label", "raddr"])
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidValue
    );
}

#[test]
fn transitions_and_durations_are_counted() {
    let mut r = Recorder::new(None);
    for _ in 0..3 {
        r.transition(&tr(1, SynSent, Established, Some(2_000_000)), Some(&curl()));
    }
    r.transition(&tr(1, Close, SynSent, Some(5)), Some(&curl()));
    r.transition(
        &Transition {
            family: Family::Ipv6,
            ..tr(1, Established, FinWait1, Some(300_000_000))
        },
        Some(&curl()),
    );
    let text = r.encode();
    assert_eq!(
        value(
            &text,
            r#"tracer_tcp_transitions_total{family="ipv4",new="ESTABLISHED",old="SYN_SENT"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"tracer_tcp_transitions_total{family="ipv6",new="FIN_WAIT1",old="ESTABLISHED"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"tracer_tcp_state_duration_seconds_bucket{state="SYN_SENT",le="0.002"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"tracer_tcp_state_duration_seconds_bucket{state="SYN_SENT",le="0.001"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            r#"tracer_tcp_state_duration_seconds_count{state="ESTABLISHED"}"#
        ),
        Some(1.0)
    );
    // Time in CLOSE is not a stay.
    assert!(!text.contains(r#"state="CLOSE""#), "{text}");
    assert!(text.contains(r#"le="0.00001""#) && text.contains(r#"le="600""#));
    assert!(text.contains("# TYPE tracer_tcp_transitions_total counter"));
    assert!(text.contains("# TYPE tracer_tcp_state_duration_seconds histogram"));
}

#[test]
fn gauges_come_from_the_tracker() {
    let mut r = Recorder::new(None);
    let mut tracker = Tracker::new(16);
    let s = 1_000_000_000u64;
    // Two established, one in CLOSE_WAIT since 130 s, one since 40 s,
    // and a listener (not a connection).
    for (sock, old, new, at) in [
        (1, SynSent, Established, 0),
        (2, SynSent, Established, 0),
        (3, SynSent, CloseWait, 130 * s),
        (4, SynSent, CloseWait, 40 * s),
        (5, Close, Listen, 0),
    ] {
        let t = Transition {
            mono_ns: at,
            lport: 1000 + sock as u16,
            ..tr(sock, old, new, None)
        };
        assert!(!tracker.on_transition(&t).untracked);
    }
    r.refresh(&mut tracker, Some(7), 140 * s);
    let text = r.encode();
    assert_eq!(
        value(&text, r#"tracer_tcp_connections{state="ESTABLISHED"}"#),
        Some(2.0)
    );
    assert_eq!(
        value(&text, r#"tracer_tcp_connections{state="CLOSE_WAIT"}"#),
        Some(2.0)
    );
    assert_eq!(
        value(&text, r#"tracer_tcp_connections{state="TIME_WAIT"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&text, r#"tracer_tcp_connections{state="LISTEN"}"#),
        None
    );
    assert_eq!(value(&text, "tracer_tcp_close_wait_stuck"), Some(1.0));
    assert_eq!(value(&text, "tracer_tcp_events_lost_total"), Some(7.0));
    r.refresh(&mut tracker, Some(9), 200 * s);
    let text = r.encode();
    assert_eq!(value(&text, "tracer_tcp_close_wait_stuck"), Some(2.0));
    assert_eq!(value(&text, "tracer_tcp_events_lost_total"), Some(9.0));

    // The threshold is --close-wait's; 0 (alerts off) keeps 30 s.
    let args = |extra: &[&str]| {
        use clap::Parser as _;
        let mut a = vec!["tracer", "--metrics", "9975"];
        a.extend(extra);
        crate::cli::Args::try_parse_from(a).unwrap()
    };
    let a = args(&["--close-wait", "2m"]);
    let mut r = Recorder::from_args(&a.metrics, a.close_wait).unwrap();
    r.refresh(&mut tracker, None, 200 * s);
    assert_eq!(value(&r.encode(), "tracer_tcp_close_wait_stuck"), Some(1.0));
    let a = args(&["--close-wait", "0"]);
    let mut r = Recorder::from_args(&a.metrics, a.close_wait).unwrap();
    r.refresh(&mut tracker, None, 140 * s);
    assert_eq!(value(&r.encode(), "tracer_tcp_close_wait_stuck"), Some(1.0));
}

#[test]
fn opt_in_label_is_capped() {
    let mut r = Recorder::new(Some((GroupBy::Lport, 2)));
    for port in [80, 443, 8080, 9090, 80] {
        r.transition(
            &Transition {
                lport: port,
                ..tr(1, SynSent, Established, Some(1000))
            },
            Some(&curl()),
        );
    }
    let text = r.encode();
    let series = |port: &str| {
        value(
            &text,
            &format!(
                r#"tracer_tcp_transitions_total{{family="ipv4",lport="{port}",new="ESTABLISHED",old="SYN_SENT"}}"#
            ),
        )
    };
    assert_eq!(series("80"), Some(2.0), "{text}");
    assert_eq!(series("443"), Some(1.0));
    assert_eq!(series("other"), Some(2.0));
    assert_eq!(series("8080"), None);
    assert!(text
        .contains(r#"tracer_tcp_state_duration_seconds_count{lport="other",state="SYN_SENT"} 2"#));

    let mut r = Recorder::new(Some((GroupBy::Comm, 5)));
    r.transition(&tr(1, SynSent, Established, Some(1000)), Some(&curl()));
    assert!(r.encode().contains(r#"comm="curl""#));
}

#[test]
fn ephemeral_port_gauges_for_the_top_destinations_only() {
    use crate::track::ports::{PortRange, Ports};
    use clap::Parser as _;
    let a =
        crate::cli::Args::try_parse_from(["tracer", "--metrics", "1", "--metrics-label-max", "2"])
            .unwrap();
    let mut r = Recorder::from_args(&a.metrics, a.close_wait).unwrap();
    let mut tracker = Tracker::new(64);
    tracker.ports = Ports::new(50);
    let netns = sample().netns;
    tracker.set_port_range(netns, PortRange::parse("40000 40099", ""));
    // Toward ports 80, 81 and 82: 3, 2 and 1 connections.
    let mut sock = 0;
    for (rport, n) in [(80u16, 3u16), (81, 2), (82, 1)] {
        for _ in 0..n {
            sock += 1;
            let t = Transition {
                lport: 40000 + sock as u16,
                rport,
                ..tr(sock, SynSent, Established, None)
            };
            tracker.on_transition(&t);
        }
    }
    r.refresh(&mut tracker, None, 0);
    let text = r.encode();
    let series = |metric: &str, rport: u16| {
        format!(
            r#"tracer_tcp_{metric}{{laddr="127.0.0.1",netns="{netns}",raddr="10.1.2.3",rport="{rport}"}}"#
        )
    };
    assert_eq!(
        value(&text, &series("ephemeral_ports_in_use", 80)),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &series("ephemeral_ports_in_use", 81)),
        Some(2.0)
    );
    assert_eq!(
        value(&text, &series("ephemeral_ports_time_wait", 81)),
        Some(0.0)
    );
    assert_eq!(
        value(&text, &series("ephemeral_ports_in_use", 82)),
        None,
        "not in the top 2"
    );
}

#[test]
fn resets_have_a_reason_label_only_where_the_kernel_gives_reasons() {
    use crate::track::close::{Rst, RstReasons};
    let mut reasons = RstReasons::default();
    reasons.add(12, 1);
    reasons.add(99, 1); // not in the kernel's BTF
    let rst = Rst {
        sent: 3,
        received: 1,
        reasons,
    };
    let mut r = Recorder::new(None);
    r.enable_resets(crate::kernel::reset_reasons::tests::sample());
    let text = r.encode();
    assert!(
        text.contains(r#"tracer_tcp_resets_total{direction="received",reason="none"} 0"#),
        "{text}"
    );
    r.closed(CloseBy::ResetSent, Some(rst));
    let text = r.encode();
    for line in [
        r#"tracer_tcp_resets_total{direction="sent",reason="TCP_ABORT_ON_LINGER"} 1"#,
        // The unnamed value, and the third reset whose reason is unknown.
        r#"tracer_tcp_resets_total{direction="sent",reason="other"} 2"#,
        r#"tracer_tcp_resets_total{direction="received",reason="none"} 1"#,
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }

    // Before 6.10: by direction only, as always.
    let mut r = Recorder::new(None);
    r.enable_resets(Default::default());
    r.closed(CloseBy::ResetSent, Some(rst));
    let text = r.encode();
    assert!(
        text.contains(r#"tracer_tcp_resets_total{direction="sent"} 3"#),
        "{text}"
    );
    assert!(!text.contains("reason="), "{text}");
    // Not enabled (no reset tracepoints): no series.
    let mut r = Recorder::new(None);
    r.closed(CloseBy::ResetSent, Some(rst));
    assert!(!r.encode().contains("resets_total"));
}
