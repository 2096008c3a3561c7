//! The sock_diag reply parser on any bytes: it must return a verdict or an
//! error, never panic, and allocate only for the sockets it returns (at
//! most one per smallest reply in the input, whatever the length fields
//! say).
//!
//! The first byte says how the rest is used: as the datagram itself, or as
//! a script of netlink messages (type, flags, whether the sequence number
//! and port id are the request's, payload, a true or a false length).
#![no_main]

use std::mem::size_of;

use libfuzzer_sys::fuzz_target;
use tracer::track::diag::{
    fuzzing::{
        parse_messages, MIN_SOCKET_BYTES, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP_INTR,
        SOCK_DIAG_BY_FAMILY,
    },
    DiagSocket,
};
use tracer_fuzz::Counting;

#[global_allocator]
static ALLOC: Counting = Counting;

const SEQ: u32 = 7;
const PID: u32 = 4242;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return check(data);
    };
    if mode & 1 == 0 {
        return check(rest);
    }
    check(&script(rest));
});

/// Netlink messages made from `data`, 4 control bytes and a payload each.
fn script(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 << 10);
    while let [ty, flags, who, plen, tail @ ..] = data {
        let ty = match ty % 5 {
            0 => NLMSG_DONE,
            1 => NLMSG_ERROR,
            2 | 3 => SOCK_DIAG_BY_FAMILY,
            _ => u16::from(*ty),
        };
        let flags = if flags & 1 != 0 { NLM_F_DUMP_INTR } else { 0 } | u16::from(flags & !1);
        let seq = if who & 1 == 0 {
            SEQ
        } else {
            SEQ ^ u32::from(who | 1)
        };
        let pid = if who & 2 == 0 { PID } else { u32::from(*who) };
        let mut plen = usize::from(*plen);
        if ty == SOCK_DIAG_BY_FAMILY && who & 8 == 0 {
            plen = MIN_SOCKET_BYTES - 16 + plen % 16; // an inet_diag_msg
        }
        let take = plen.min(tail.len());
        let mut payload = tail[..take].to_vec();
        payload.resize(plen, 0);
        data = &tail[take..];
        if ty == SOCK_DIAG_BY_FAMILY && plen > 0 && who & 16 == 0 {
            payload[0] = if who & 32 == 0 { 2 } else { 10 }; // AF_INET, AF_INET6
        }
        let mut len = (16 + plen) as u32;
        if who & 4 != 0 {
            // A length that lies, taken from the payload's first bytes.
            len = payload
                .get(..4)
                .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()));
        }
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&pid.to_ne_bytes());
        out.extend_from_slice(&payload);
        while out.len() % 4 != 0 && who & 64 == 0 {
            out.push(0);
        }
    }
    out.extend_from_slice(data); // a partial header, if any
    out
}

fn check(buf: &[u8]) {
    let mut out = Vec::new();
    tracer_fuzz::reset();
    let parsed = parse_messages(buf, SEQ, PID, &mut out);
    let spent = tracer_fuzz::allocated();
    assert!(
        out.len() <= buf.len() / MIN_SOCKET_BYTES,
        "{} sockets from {} bytes",
        out.len(),
        buf.len()
    );
    // A vector's growth (doubling from 4), and an error's box.
    let bound = 4 * out.len().max(4) * size_of::<DiagSocket>() + 256;
    assert!(
        spent.bytes <= bound,
        "allocated {spent:?} for {} sockets from {} bytes",
        out.len(),
        buf.len()
    );
    match parsed {
        Ok(chunk) => {
            if !out.is_empty() || chunk.done || chunk.interrupted {
                assert!(chunk.answered, "{chunk:?}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
