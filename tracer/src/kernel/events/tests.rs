//! Unit tests of `events` (no root needed).
use super::*;

pub(crate) fn comm(s: &str) -> Comm {
    let mut raw = [0u8; 16];
    raw[..s.len()].copy_from_slice(s.as_bytes());
    Comm(raw)
}

pub(crate) fn sample() -> Transition {
    Transition {
        mono_ns: 1_000_000_123,
        sock: 0xffff_8880_1234_5678,
        task: true,
        pid: 42,
        tid: 43,
        uid: 1000,
        comm: comm("curl"),
        family: Family::Ipv4,
        laddr: "127.0.0.1".parse().unwrap(),
        lport: 43210,
        raddr: "10.1.2.3".parse().unwrap(),
        rport: 80,
        old: TcpState::SynSent,
        new: TcpState::Established,
        old_state_ns: Some(1234),
        netns: 4026531840,
        cgroup: 0x1234,
        source: Source::Tracepoint,
    }
}

#[test]
fn round_trip_ipv4() {
    let t = sample();
    assert_eq!(decode(&encode(&t)), Ok(t));
}

#[test]
fn round_trip_ipv6_unknown_duration() {
    let t = Transition {
        family: Family::Ipv6,
        laddr: "::1".parse().unwrap(),
        raddr: "2001:db8::7".parse().unwrap(),
        old: TcpState::Close,
        new: TcpState::Listen,
        old_state_ns: None,
        ..sample()
    };
    assert_eq!(decode(&encode(&t)), Ok(t));
}

/// A batch as the kernel builds it: a client's connect (task recorded),
/// its handshake (none), then an unknown-duration step.
fn batch_bytes(nsteps: u8) -> Vec<u8> {
    use tracer_common::{BatchBody, BatchStep, TaskSlot};
    let mut b = BatchBody {
        nsteps,
        nowners: 1,
        ..Default::default()
    };
    b.owners[0] = TaskSlot {
        pid: 7,
        tid: 8,
        uid: 9,
        comm: comm("client").0,
        cgroup: 77,
        ..Default::default()
    };
    let step = |ts, old: TcpState, new: TcpState, ns, owner| BatchStep {
        ts_ns: ts,
        old_state_ns: ns,
        old: old as u8,
        new: new as u8,
        flags: if ns > 0 {
            FLAG_OLD_STATE_KNOWN as u8
        } else {
            0
        },
        owner,
        _pad: 0,
    };
    b.steps[0] = step(100, TcpState::Close, TcpState::SynSent, 0, 1);
    b.steps[1] = step(160, TcpState::SynSent, TcpState::Established, 60, 0);
    b.steps[2] = step(900, TcpState::FinWait1, TcpState::FinWait2, 0, 0);
    let mut saddr = [0u8; 16];
    saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    // As the kernel sends it: as long as its steps.
    let len = tracer_common::batch_event_len(usize::from(nsteps).min(6));
    let ev = BatchEvent {
        header: EventHeader {
            ts_ns: 100,
            kind: EventKind::Batch as u32,
            len: len as u32,
        },
        skaddr: 0xabc,
        saddr,
        daddr: saddr,
        sport: 40000,
        dport: 80,
        family: AF_INET,
        netns: 5,
        batch: b,
        ..Default::default()
    };
    bytemuck::bytes_of(&ev)[..len].to_vec()
}

#[test]
fn batch_decodes_into_the_transitions_sent_alone() {
    let bytes = batch_bytes(3);
    let Ok(Record::Batch(b)) = decode_record(&bytes) else {
        panic!("not a batch");
    };
    let ts: Vec<Transition> = b.transitions().collect();
    assert_eq!(ts.len(), 3);
    assert_eq!((ts[0].old, ts[0].new), (TcpState::Close, TcpState::SynSent));
    assert_eq!((ts[0].pid, ts[0].tid, ts[0].uid), (7, 8, 9));
    assert_eq!(ts[0].cgroup, 77, "the owner's cgroup travels with its task");
    assert_eq!(ts[1].cgroup, 0);
    assert_eq!(ts[0].comm, comm("client"));
    assert_eq!(ts[0].old_state_ns, None);
    assert_eq!(ts[1].pid, 0, "no task recorded outside the owner's calls");
    assert_eq!(ts[1].old_state_ns, Some(60));
    assert_eq!(ts[1].mono_ns, 160);
    assert_eq!(ts[2].old_state_ns, None);
    for t in &ts {
        assert_eq!((t.sock, t.lport, t.rport, t.netns), (0xabc, 40000, 80, 5));
        assert_eq!(t.laddr, "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}

#[test]
fn bad_batches_are_rejected() {
    assert_eq!(decode_batch(&batch_bytes(0)), Err(DecodeError::BadSteps(0)));
    assert_eq!(decode_batch(&batch_bytes(7)), Err(DecodeError::BadSteps(7)));
    let bytes = batch_bytes(3);
    assert!(matches!(
        decode_record(&bytes[..bytes.len() - 8]),
        Err(DecodeError::BadLength { .. })
    ));
    // A header that claims other than its steps' length.
    let mut wrong = batch_bytes(2);
    wrong[12..16].copy_from_slice(&(tracer_common::batch_event_len(3) as u32).to_ne_bytes());
    assert!(matches!(
        decode_record(&wrong),
        Err(DecodeError::BadLength { .. })
    ));
}

#[test]
fn every_state_round_trips() {
    for s in TcpState::ALL {
        assert_eq!(TcpState::from_kernel(s as u8), Some(s));
    }
    assert_eq!(TcpState::from_kernel(0), None);
    assert_eq!(TcpState::from_kernel(13), None);
}

#[test]
fn short_records_are_rejected() {
    let bytes = encode(&sample());
    assert_eq!(decode(&bytes[..8]), Err(DecodeError::ShortHeader(8)));
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1]),
        Err(DecodeError::BadLength { .. })
    ));
    assert_eq!(decode(&[]), Err(DecodeError::ShortHeader(0)));
}

#[test]
fn unknown_kind_state_and_family_are_rejected() {
    let mut bytes = encode(&sample());
    bytes[8] = 99;
    assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind(99)));

    let mut bytes = encode(&sample());
    let off = std::mem::offset_of!(TransitionEvent, newstate);
    bytes[off] = 0;
    assert_eq!(decode(&bytes), Err(DecodeError::BadState(0)));

    let mut bytes = encode(&sample());
    let off = std::mem::offset_of!(TransitionEvent, family);
    bytes[off] = 1;
    assert_eq!(decode(&bytes), Err(DecodeError::BadFamily(1)));
}

#[test]
fn reset_records_decode() {
    let ev = ResetEvent {
        header: EventHeader {
            ts_ns: 11,
            kind: EventKind::Reset as u32,
            len: size_of::<ResetEvent>() as u32,
        },
        skaddr: 0xfeed,
        direction: RESET_SENT,
        state: TcpState::Established as u8,
        _pad: [0; 2],
        reason: 12,
    };
    let mut bytes = bytemuck::bytes_of(&ev).to_vec();
    assert_eq!(
        decode_record(&bytes),
        Ok(Record::Reset(Reset {
            mono_ns: 11,
            sock: 0xfeed,
            direction: ResetDirection::Sent,
            state: Some(TcpState::Established),
            reason: Some(12),
        }))
    );
    let dir = std::mem::offset_of!(ResetEvent, direction);
    bytes[dir] = RESET_RECEIVED;
    bytes[dir + 1] = 0;
    let reason = std::mem::offset_of!(ResetEvent, reason);
    bytes[reason..reason + 4].copy_from_slice(&tracer_common::RESET_REASON_NONE.to_ne_bytes());
    let Ok(Record::Reset(r)) = decode_record(&bytes) else {
        panic!("not a reset")
    };
    assert_eq!(
        (r.direction, r.state, r.reason),
        (ResetDirection::Received, None, None)
    );
    bytes[dir] = 3;
    assert_eq!(decode_record(&bytes), Err(DecodeError::BadDirection(3)));
    assert!(matches!(
        decode_record(&bytes[..20]),
        Err(DecodeError::BadLength { .. })
    ));
}

#[test]
fn timewait_death_records_decode() {
    let ev = TimewaitDeathEvent {
        header: EventHeader {
            ts_ns: 7,
            kind: EventKind::TimewaitDeath as u32,
            len: size_of::<TimewaitDeathEvent>() as u32,
        },
        saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport: 40000,
        dport: 80,
        family: AF_INET,
        netns: 9,
        ..Default::default()
    };
    let bytes = bytemuck::bytes_of(&ev);
    let Ok(Record::TimewaitDeath(d)) = decode_record(bytes) else {
        panic!("not a death")
    };
    assert_eq!((d.mono_ns, d.lport, d.rport, d.netns), (7, 40000, 80, 9));
    assert_eq!(d.raddr, "127.0.0.2".parse::<IpAddr>().unwrap());
    assert!(matches!(
        decode_record(&bytes[..40]),
        Err(DecodeError::BadLength { .. })
    ));
    assert!(matches!(
        decode_record(&encode(&sample())),
        Ok(Record::Transition(_))
    ));
}

#[test]
fn comm_stops_at_nul_and_tolerates_garbage() {
    assert_eq!(comm("nginx").as_str(), "nginx");
    assert_eq!(Comm([b'x'; 16]).as_str(), "x".repeat(16));
    let mut raw = [0u8; 16];
    raw[0] = 0xff;
    assert_eq!(Comm(raw).as_str(), "\u{fffd}");
}

#[test]
fn unreadable_records_count_the_transitions_they_claim() {
    // A batch whose third step has a bad state: its 3 transitions.
    let mut bad = batch_bytes(3);
    let third = bad.len() - size_of::<tracer_common::BatchStep>();
    bad[third + 16] = 99;
    assert!(decode_record(&bad).is_err());
    assert_eq!(transitions_claimed(&bad), 3);
    // An implausible step count, or a bare header: one record's worth.
    assert_eq!(transitions_claimed(&batch_bytes(9)), 1);
    assert_eq!(transitions_claimed(&[0u8; 4]), 1);
    // A reset or a timewait death carries no transition.
    let mut reset = [0u8; 32];
    reset[8..12].copy_from_slice(&(EventKind::Reset as u32).to_ne_bytes());
    assert_eq!(transitions_claimed(&reset[..20]), 0);
}
