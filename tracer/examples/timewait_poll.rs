//! Measures the cost of one timewait poll (a NETLINK_SOCK_DIAG dump of
//! FIN_WAIT2|TIME_WAIT sockets) with N timewait sockets present that the
//! tracer does not track. Run as root: `cargo run --release --example
//! timewait_poll -- 100000`. Works in a network namespace of its own.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::Instant,
};

use tracer::{
    kernel::events::{Family, TcpState},
    track::diag::{state_bit, Diag},
};

fn sysctl(name: &str, value: &str) {
    std::fs::write(format!("/proc/sys/{}", name.replace('.', "/")), value).expect(name);
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    assert_eq!(
        // SAFETY: unshare affects this (only) thread.
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "needs root"
    );
    std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip");
    sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    sysctl("net.ipv4.tcp_max_tw_buckets", "1000000");
    // No reuse of timewait sockets (loopback reuses them by default).
    sysctl("net.ipv4.tcp_tw_reuse", "0");
    // Two servers' ports x ~64k client ports.
    let listeners: Vec<TcpListener> = (0..(n / 30_000 + 1))
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let t = Instant::now();
    for i in 0..n {
        let c = TcpStream::connect(addrs[i % addrs.len()]).expect("connect");
        let (s, _) = listeners[i % addrs.len()].accept().unwrap();
        drop(c); // the client closes first: its side becomes a timewait socket
        drop(s);
    }
    eprintln!("created {n} connections in {:.1?}", t.elapsed());
    let mut diag = Diag::new().unwrap();
    let mask = state_bit(TcpState::TimeWait) | state_bit(TcpState::FinWait2);
    let all = diag.dump(Family::Ipv4, mask).unwrap();
    let tracked: Vec<(u16, u16)> = all
        .iter()
        .step_by(all.len() / 64)
        .take(64)
        .map(|s| (s.lport, s.rport))
        .collect();
    let mut measure = |what: &str, f: &mut dyn FnMut(&mut Diag) -> usize| {
        let mut times = Vec::new();
        let mut count = 0;
        for _ in 0..7 {
            let t = Instant::now();
            count = f(&mut diag);
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "{what}: {count} sockets returned; median {:.2?} (min {:.2?}, max {:.2?})",
            times[3], times[0], times[6]
        );
    };
    println!("{} timewait sockets present", all.len());
    measure("full dump + parse", &mut |d| {
        d.dump(Family::Ipv4, mask).unwrap().len()
    });
    let filtered = |d: &mut Diag, ports: &[(u16, u16)]| {
        let mut out = Vec::new();
        d.dump_into(Family::Ipv4, mask, Some(ports), &mut out, &mut |s| {
            Some(s.lport)
        })
        .unwrap();
        out.len()
    };
    measure("filtered to 1 tracked connection", &mut |d| {
        filtered(d, &tracked[..1])
    });
    measure("filtered to 64 tracked connections", &mut |d| {
        filtered(d, &tracked)
    });
}
