//! The tracker's rules, on synthetic transitions (no root needed).
use std::net::IpAddr;

use super::*;
use crate::kernel::events::tests::{comm, sample};
use crate::kernel::events::Family;
use TcpState::*;

/// A transition of socket 1 at `ms` milliseconds.
fn tr(ms: u64, old: TcpState, new: TcpState, known: Option<u64>) -> Transition {
    Transition {
        mono_ns: ms * 1_000_000,
        sock: 1,
        old,
        new,
        old_state_ns: known.map(|m| m * 1_000_000),
        ..sample()
    }
}

/// Feeds `steps` as one socket's life and returns its record.
fn life(steps: &[Transition]) -> Connection {
    let mut tr = Tracker::new(16);
    let (last, init) = steps.split_last().unwrap();
    for t in init {
        let o = tr.on_transition(t);
        assert!(o.closed.is_empty() && !o.untracked);
    }
    let o = tr.on_transition(last);
    assert_eq!(o.closed.len(), 1, "expected a closed connection: {o:?}");
    assert!(tr.is_empty());
    tr.take(o.closed[0])
}

/// The only connection waiting for its timewait socket.
fn waiting(t: &mut Tracker) -> (SlotId, &mut Connection) {
    t.timewait_mut().next().expect("a connection in timewait")
}

fn ms(c: &Connection, s: TcpState) -> Option<u64> {
    c.state_ns(s).map(|n| n / 1_000_000)
}

fn assert_sums(c: &Connection) {
    assert_eq!(c.states().map(|(_, n)| n).sum::<u64>(), c.duration_ns());
}

#[test]
fn passive_close_of_accepted_child() {
    let c = life(&[
        tr(10, Listen, SynRecv, None),
        tr(11, SynRecv, Established, Some(1)),
        tr(50, Established, CloseWait, Some(39)),
        tr(70, CloseWait, LastAck, Some(20)),
        tr(71, LastAck, Close, Some(1)),
    ]);
    assert!(c.complete);
    assert_eq!(
        ms(&c, Listen),
        None,
        "the listener's LISTEN is not the child's"
    );
    assert_eq!(ms(&c, CloseWait), Some(20));
    assert_eq!(ms(&c, LastAck), Some(1));
    assert_eq!(c.duration_ns(), 61_000_000);
    assert!(c.timewait.is_none());
    assert_sums(&c);
}

#[test]
fn reset_while_established() {
    let c = life(&[
        tr(0, Close, SynSent, None),
        tr(2, SynSent, Established, Some(2)),
        tr(9, Established, Close, Some(7)),
    ]);
    assert_eq!(ms(&c, Established), Some(7));
    assert_eq!(c.duration_ns(), 9_000_000);
    assert_sums(&c);
}

#[test]
fn active_close_waits_for_its_timewait_socket() {
    let mut t = Tracker::new(8);
    for step in [
        tr(100, Close, SynSent, None),
        tr(101, SynSent, Established, Some(1)),
        tr(301, Established, FinWait1, Some(200)),
        tr(302, FinWait1, FinWait2, Some(1)),
    ] {
        t.on_transition(&step);
    }
    let o = t.on_transition(&tr(305, FinWait2, Close, Some(3)));
    assert!(
        o.closed.is_empty(),
        "not reported before its timewait socket ends"
    );
    assert!(t.has_timewait());
    let (id, conn) = waiting(&mut t);
    assert_eq!(conn.state, FinWait2);
    assert_eq!(conn.timewait.unwrap().closed_ns, 305_000_000);
    // Peer's FIN at 400 ms: TIME_WAIT; the timer fires 60 s later.
    conn.advance(TimeWait, 400_000_000);
    let derived = t
        .end_timewait(id, 60_400_000_000, TimewaitEnd::Expired, Source::SockDiag)
        .unwrap();
    assert!(!t.has_timewait());
    let conn = t.take(id);
    assert_eq!(
        (derived.old, derived.new, derived.source),
        (TimeWait, Close, Source::SockDiag)
    );
    assert_eq!(derived.old_state_ns, Some(60_000_000_000));
    assert_eq!(ms(&conn, FinWait2), Some(98));
    assert_eq!(ms(&conn, TimeWait), Some(60_000));
    assert_eq!(conn.duration_ns(), 60_300_000_000);
    assert_sums(&conn);
}

#[test]
fn closing_goes_straight_to_time_wait() {
    let mut t = Tracker::new(8);
    t.on_transition(&tr(0, Established, FinWait1, None));
    t.on_transition(&tr(1, FinWait1, Closing, Some(1)));
    assert!(t
        .on_transition(&tr(2, Closing, Close, Some(1)))
        .closed
        .is_empty());
    assert_eq!(waiting(&mut t).1.state, TimeWait);
}

#[test]
fn a_new_connection_on_the_same_tuple_ends_the_timewait() {
    let mut t = Tracker::new(8);
    t.on_transition(&tr(0, Close, SynSent, None));
    t.on_transition(&tr(1, SynSent, Established, Some(1)));
    t.on_transition(&tr(5, Established, FinWait1, Some(4)));
    t.on_transition(&tr(6, FinWait1, FinWait2, Some(1)));
    t.on_transition(&tr(7, FinWait2, Close, Some(1)));
    waiting(&mut t).1.advance(TimeWait, 8_000_000);
    // Socket 2 connects on the same 4-tuple at 1500 ms, established at 1501.
    let again = |ms: u64, old, new, known| Transition {
        sock: 2,
        ..tr(ms, old, new, known)
    };
    t.on_transition(&again(1500, Close, SynSent, None));
    let o = t.on_transition(&again(1501, SynSent, Established, Some(1)));
    assert_eq!(o.closed.len(), 1);
    let old = &t.take(o.closed[0]);
    assert_eq!(old.sock, 1);
    assert_eq!(old.timewait.unwrap().end, Some(TimewaitEnd::Reused));
    assert_eq!(ms(old, TimeWait), Some(1492));
    let d = o.derived.unwrap().t;
    assert_eq!((d.old, d.new, d.source), (TimeWait, Close, Source::Reuse));
    assert_eq!(d.mono_ns, 1_500_000_000);
    assert_sums(old);
    assert!(!t.has_timewait());
}

#[test]
fn fentry_deaths_give_exact_expiry_and_reuse_times() {
    let mut t = Tracker::new(8);
    t.on_transition(&tr(0, Established, FinWait1, None));
    t.on_transition(&tr(1, FinWait1, FinWait2, Some(1)));
    t.on_transition(&tr(2, FinWait2, Close, Some(1)));
    let key = waiting(&mut t).1.key();
    {
        let c = waiting(&mut t).1;
        c.advance(TimeWait, 3_000_000);
        c.timewait.as_mut().unwrap().set_expires_ns(60_003_000_000);
    }
    // Killed early (no reuse seen yet): kept, not ended.
    let o = t.timewait_died(&key, 500_000_000, 10_000_000);
    assert!(o.closed.is_empty());
    // The reusing connection then takes the exact kill time.
    let again = |ms: u64, old, new, known| Transition {
        sock: 2,
        ..tr(ms, old, new, known)
    };
    let o = t.on_transition(&again(501, SynSent, Established, Some(1)));
    assert_eq!(
        t.conn(o.closed[0]).timewait.unwrap().end,
        Some(TimewaitEnd::Reused)
    );
    let d = o.derived.unwrap().t;
    assert_eq!(d.source, Source::Fentry);
    assert_eq!(d.mono_ns, 500_000_000);

    // A death at the timer (here 1.5 s late, the timer wheel) expires.
    let mut t = Tracker::new(8);
    t.on_transition(&tr(0, FinWait1, Closing, None));
    t.on_transition(&tr(1, Closing, Close, Some(1)));
    let key = waiting(&mut t).1.key();
    waiting(&mut t)
        .1
        .timewait
        .as_mut()
        .unwrap()
        .set_expires_ns(60_001_000_000);
    let o = t.timewait_died(&key, 61_500_000_000, 10_000_000);
    assert_eq!(o.closed.len(), 1);
    let c = t.take(o.closed[0]);
    assert_eq!(c.timewait.unwrap().end, Some(TimewaitEnd::Expired));
    assert_eq!(ms(&c, TimeWait), Some(61_499));
    assert_sums(&c);
}

#[test]
fn first_seen_mid_life_is_incomplete() {
    // Established before the tracer started: the kernel never timed it.
    let c = life(&[
        tr(500, Established, CloseWait, None),
        tr(501, CloseWait, LastAck, Some(1)),
        tr(502, LastAck, Close, Some(1)),
    ]);
    assert!(!c.complete);
    assert_eq!(c.first_seen_ns, 500_000_000);
    assert_eq!(c.start_ns, 500_000_000);
    assert_eq!(ms(&c, Established), None);
    assert_eq!(c.duration_ns(), 2_000_000);
    assert_sums(&c);
}

#[test]
fn snapshot_sockets_count_from_the_snapshot() {
    let mut t = Tracker::new(8);
    let first = tr(0, CloseWait, Close, None);
    let owner = Owner {
        pid: 99,
        comm: comm("server"),
        uid: 0,
        ..Default::default()
    };
    let key = Tracker::key_of(&first);
    t.add_snapshot(
        Connection::from_snapshot(key, CloseWait, 100_000_000, 555, Some(owner)),
        &[],
    );
    assert_eq!(t.in_state_mut(CloseWait).count(), 1);
    // A reset ends it in softirq: the owner stays the snapshot's.
    let mut softirq = tr(900, CloseWait, Close, None);
    softirq.pid = 0;
    let o = t.on_transition(&softirq);
    assert_eq!(o.owner.unwrap().pid, 99);
    let c = t.take(o.closed[0]);
    assert!(c.from_snapshot && !c.complete);
    assert_eq!(c.inode, 555);
    assert_eq!(ms(&c, CloseWait), Some(800));
    assert_eq!(c.duration_ns(), 800_000_000);
    assert_sums(&c);
}

#[test]
fn a_birth_is_new_even_if_the_snapshot_saw_it() {
    let mut t = Tracker::new(8);
    let child = tr(10, Listen, SynRecv, None);
    t.add_snapshot(
        Connection::from_snapshot(Tracker::key_of(&child), Established, 5_000_000, 9, None),
        &[],
    );
    t.on_transition(&child);
    let c = t.get(1).unwrap();
    assert!(c.complete && !c.from_snapshot);
    assert_eq!(t.len(), 1, "the snapshot's copy is dropped");
}

#[test]
fn first_seen_with_kernel_timing_starts_earlier() {
    // The kernel timed ESTABLISHED (its entry was filtered in the kernel).
    let c = life(&[
        tr(500, Established, CloseWait, Some(300)),
        tr(510, CloseWait, LastAck, Some(10)),
        tr(511, LastAck, Close, Some(1)),
    ]);
    assert_eq!(c.start_ns, 200_000_000);
    assert_eq!(ms(&c, Established), Some(300));
    assert_eq!(c.duration_ns(), 311_000_000);
    assert_sums(&c);
}

#[test]
fn missing_transition_is_a_gap_and_still_sums() {
    let c = life(&[
        tr(0, Close, SynSent, None),
        tr(1, SynSent, Established, Some(1)),
        // ESTABLISHED -> CLOSE_WAIT at 100 was lost.
        tr(130, CloseWait, LastAck, Some(30)),
        tr(131, LastAck, Close, Some(1)),
    ]);
    assert!(c.gap);
    assert_eq!(ms(&c, Established), Some(99));
    assert_eq!(ms(&c, CloseWait), Some(30));
    assert_sums(&c);
}

#[test]
fn owner_is_never_the_softirq_task() {
    let mut t = Tracker::new(8);
    let mut softirq = tr(500, Established, CloseWait, None);
    softirq.pid = 0;
    softirq.comm = comm("swapper/1");
    assert_eq!(t.on_transition(&softirq).owner, None);
    let mut close = tr(510, CloseWait, LastAck, Some(10));
    close.pid = 8;
    close.comm = comm("server");
    assert_eq!(t.on_transition(&close).owner.unwrap().pid, 8);
}

#[test]
fn accepted_socket_inherits_its_listeners_owner() {
    let mut t = Tracker::new(8);
    let listen = Transition {
        sock: 10,
        pid: 8,
        comm: comm("server"),
        lport: 80,
        ..tr(0, Close, Listen, None)
    };
    t.on_transition(&listen);
    // The child is created in softirq on the client's task.
    let child = Transition {
        sock: 11,
        pid: 7,
        comm: comm("client"),
        lport: 80,
        ..tr(1, Listen, SynRecv, None)
    };
    let o = t.on_transition(&child);
    assert_eq!(o.owner.unwrap().pid, 8);
    // A second listener of another process on the port: unknown.
    t.on_transition(&Transition {
        sock: 12,
        pid: 9,
        lport: 80,
        ..tr(2, Close, Listen, None)
    });
    let o = t.on_transition(&Transition {
        sock: 13,
        pid: 7,
        lport: 80,
        ..tr(3, Listen, SynRecv, None)
    });
    assert_eq!(o.owner, None);
    assert_eq!(t.listener_pids(sample().netns, 80), Some(&[8, 9][..]));
}

#[test]
fn listeners_of_one_comm_give_it_without_a_pid() {
    let mut t = Tracker::new(8);
    // SO_REUSEPORT: two workers of one server, each with its listener.
    for (sock, pid) in [(10, 8), (12, 9)] {
        t.on_transition(&Transition {
            sock,
            pid,
            comm: comm("server"),
            lport: 80,
            ..tr(0, Close, Listen, None)
        });
    }
    let o = t.on_transition(&Transition {
        sock: 13,
        pid: 7,
        lport: 80,
        ..tr(3, Listen, SynRecv, None)
    });
    let owner = o.owner.unwrap();
    assert_eq!((owner.known_pid(), owner.comm), (None, comm("server")));
    assert_eq!(t.listener_pids(sample().netns, 80), Some(&[8, 9][..]));
    // A prefork server found at start: one listener, two holders.
    let mut t = Tracker::new(8);
    let listener = Connection::from_snapshot(
        TupleKey {
            netns: 0,
            family: Family::Ipv4,
            laddr: "0.0.0.0".parse().unwrap(),
            lport: 81,
            raddr: "0.0.0.0".parse().unwrap(),
            rport: 0,
        },
        Listen,
        0,
        5,
        Some(Owner {
            pid: 0,
            comm: comm("server"),
            ..Default::default()
        }),
    );
    t.add_snapshot(listener, &[20, 21]);
    assert_eq!(t.listener_pids(0, 81), Some(&[20, 21][..]));
    assert_eq!(t.listener_pids(0, 82), None);
}

#[test]
fn accepted_connections_are_looked_up_once_they_last() {
    let mut t = Tracker::new(8);
    t.on_transition(&Transition {
        sock: 10,
        pid: 8,
        comm: comm("server"),
        lport: 80,
        ..tr(0, Close, Listen, None)
    });
    let child = |sock, rport, at| {
        [
            Transition {
                sock,
                lport: 80,
                rport,
                ..tr(at, Listen, SynRecv, None)
            },
            Transition {
                sock,
                lport: 80,
                rport,
                ..tr(at + 1, SynRecv, Established, Some(1))
            },
        ]
    };
    for (sock, rport, at) in [(11, 1000, 10), (12, 1001, 20), (13, 1002, 30)] {
        for step in child(sock, rport, at) {
            t.on_transition(&step);
        }
    }
    // 12 is closed by its owner (named by its own system call), 13 ends.
    let mut fin = Transition {
        sock: 12,
        pid: 9,
        comm: comm("worker"),
        lport: 80,
        rport: 1001,
        ..tr(40, Established, FinWait1, Some(19))
    };
    t.on_transition(&fin);
    fin.sock = 13;
    fin.rport = 1002;
    fin.old = Established;
    fin.new = Close;
    t.on_transition(&fin);
    assert!(t.due_accepted(5_000_000, 10).is_empty(), "none is due yet");
    let due = t.due_accepted(1_000_000_000, 10);
    assert_eq!(
        due.len(),
        1,
        "only the open one still owned by its listener"
    );
    let (id, c) = due[0];
    assert_eq!((c.sock, c.owner.unwrap().pid), (11, 8));
    assert!(t.due_accepted(1_000_000_000, 10).is_empty(), "asked once");
    let worker = Owner {
        pid: 9,
        comm: comm("worker"),
        ..Default::default()
    };
    assert!(t.set_accepted_owner(id, &c, worker));
    let o = t.on_transition(&Transition {
        sock: 11,
        lport: 80,
        rport: 1000,
        pid: 0,
        ..tr(2_000, Established, CloseWait, Some(1_989))
    });
    assert_eq!(o.owner.unwrap().pid, 9);
    // An answer for a connection that ended meanwhile changes nothing.
    t.on_transition(&Transition {
        sock: 11,
        lport: 80,
        rport: 1000,
        ..tr(2_001, CloseWait, Close, Some(1))
    });
    assert!(!t.set_accepted_owner(id, &c, worker));
}

#[test]
fn endpoints_fill_in_when_bound() {
    let mut connect = tr(0, Close, SynSent, None);
    connect.lport = 0;
    connect.laddr = "0.0.0.0".parse().unwrap();
    let c = life(&[connect, tr(1, SynSent, Close, Some(1))]);
    assert_eq!(c.lport, 43210);
    assert_eq!(c.laddr, "127.0.0.1".parse::<IpAddr>().unwrap());
}

#[test]
fn socket_reused_after_close_starts_a_new_connection() {
    let mut tr_ = Tracker::new(4);
    tr_.on_transition(&tr(0, Close, SynSent, None));
    assert_eq!(
        tr_.on_transition(&tr(5, SynSent, Close, Some(5)))
            .closed
            .len(),
        1
    );
    tr_.on_transition(&tr(10, Close, SynSent, None));
    assert_eq!(tr_.get(1).unwrap().start_ns, 10_000_000);
}

#[test]
fn full_tracker_counts_untracked() {
    let mut t = Tracker::new(1);
    t.on_transition(&tr(0, Close, SynSent, None));
    let other = Transition {
        sock: 2,
        ..tr(1, Close, SynSent, None)
    };
    assert!(t.on_transition(&other).untracked);
    assert_eq!(t.untracked, 1);
    assert_eq!(t.len(), 1);
}

/// Ports held toward the sample's destination, and of them in timewait.
fn held(t: &Tracker) -> (u32, u32) {
    t.ports
        .pressures()
        .next()
        .map_or((0, 0), |p| (p.in_use, p.time_wait))
}

#[test]
fn ephemeral_ports_are_held_by_clients_until_their_timewait_ends() {
    use crate::track::ports::{PortRange, Ports};
    let mut t = Tracker::new(16);
    t.ports = Ports::new(50);
    let netns = sample().netns;
    // A client and an accepted socket, both with ports in the range,
    // before the range is known: nothing is counted, the namespace is asked.
    let unbound = Transition {
        lport: 0,
        ..tr(1, Close, SynSent, None)
    };
    t.on_transition(&unbound);
    t.on_transition(&tr(2, SynSent, Established, Some(1)));
    let child = |ms, old, new| Transition {
        sock: 2,
        raddr: "10.9.9.9".parse().unwrap(),
        ..tr(ms, old, new, None)
    };
    t.on_transition(&child(3, Listen, SynRecv));
    assert_eq!(held(&t), (0, 0));
    assert_eq!(t.ports.wanted, vec![(netns, Some((42, 43)))]);
    // The range comes: the connections already there are counted.
    t.set_port_range(netns, PortRange::parse("43000 43299", ""));
    assert_eq!(held(&t), (1, 0), "the client only");
    assert_eq!(t.ports.pressures().count(), 1);
    t.on_transition(&tr(10, Established, FinWait1, Some(8)));
    t.on_transition(&tr(11, FinWait1, FinWait2, Some(1)));
    t.on_transition(&tr(12, FinWait2, Close, Some(1)));
    assert_eq!(held(&t), (1, 1), "in its timewait socket");
    let (id, _) = waiting(&mut t);
    t.end_timewait(id, 60_000_000_000, TimewaitEnd::Expired, Source::SockDiag);
    t.release(id);
    assert_eq!(held(&t), (0, 0));
    assert_eq!(
        t.ports.pressures().count(),
        0,
        "entries go with their last port"
    );
}

#[test]
fn tuple_keys_that_differ_in_any_field_hash_apart() {
    use std::hash::BuildHasher as _;
    let h = foldhash::fast::FixedState::with_seed(7);
    let v4 = TupleKey {
        netns: 4026531840,
        family: Family::Ipv4,
        laddr: "127.0.0.1".parse().unwrap(),
        lport: 40000,
        raddr: "127.0.0.2".parse().unwrap(),
        rport: 80,
    };
    let v6 = TupleKey {
        family: Family::Ipv6,
        laddr: "::1".parse().unwrap(),
        raddr: "::2".parse().unwrap(),
        ..v4
    };
    let mut keys = vec![v4, v6];
    for base in [v4, v6] {
        keys.push(TupleKey {
            netns: base.netns + 1,
            ..base
        });
        keys.push(TupleKey {
            lport: base.rport,
            rport: base.lport,
            ..base
        });
        keys.push(TupleKey {
            laddr: base.raddr,
            raddr: base.laddr,
            ..base
        });
        keys.push(TupleKey {
            lport: base.lport + 1,
            ..base
        });
        keys.push(TupleKey {
            rport: base.rport + 1,
            ..base
        });
    }
    let hashes: std::collections::HashSet<u64> = keys.iter().map(|k| h.hash_one(k)).collect();
    assert_eq!(hashes.len(), keys.len());
    assert_eq!(h.hash_one(v6), h.hash_one(TupleKey { ..v6 }));
}
