//! The ring buffer record decoder (`decode_record`) on any bytes: it must
//! return a record or an error, never panic, and allocate nothing.
//!
//! The first byte says how the rest is used: as the record itself, or as
//! the body of a record of a chosen kind (the four the kernel sends, or an
//! unknown one) whose length is chosen too, with a header that tells that
//! length, the kind's own length, or whatever the input says.
#![no_main]

use std::mem::{offset_of, size_of};

use libfuzzer_sys::fuzz_target;
use tracer::kernel::events::{decode, decode_record, encode, Record};
use tracer_common::{batch_event_len, BatchBody, BatchEvent, EventKind, BATCH_STEPS};
use tracer_fuzz::Counting;

#[global_allocator]
static ALLOC: Counting = Counting;

/// Longer than any record (a full batch is about 300 bytes).
const MAX: usize = 1024;
const KIND_AT: usize = 8;
const LEN_AT: usize = 12;
const NSTEPS_AT: usize = offset_of!(BatchEvent, batch) + offset_of!(BatchBody, nsteps);

fuzz_target!(|data: &[u8]| {
    let mut buf = [0u8; MAX];
    check(shape(data, &mut buf));
});

fn shape<'a>(data: &'a [u8], buf: &'a mut [u8; MAX]) -> &'a [u8] {
    let Some((&mode, rest)) = data.split_first() else {
        return data;
    };
    if mode & 3 == 0 || rest.len() < 2 {
        return rest;
    }
    let kinds = [
        EventKind::Transition as u32,
        EventKind::TimewaitDeath as u32,
        EventKind::Batch as u32,
        EventKind::Reset as u32,
        u32::from(mode),
    ];
    let kind = kinds[usize::from(mode >> 2) % kinds.len()];
    let mut len = usize::from(u16::from_le_bytes([rest[0], rest[1]])) % MAX;
    let body = &rest[2..];
    let n = body.len().min(MAX);
    buf[..n].copy_from_slice(&body[..n]);
    if len >= LEN_AT + 4 {
        buf[KIND_AT..KIND_AT + 4].copy_from_slice(&kind.to_ne_bytes());
        let claimed = match mode & 3 {
            // The length it has.
            1 => len as u32,
            // Its kind's own length (a batch's follows its step count).
            2 => {
                let own = match kind {
                    k if k == EventKind::Batch as u32 => {
                        let steps = buf[NSTEPS_AT] % (BATCH_STEPS as u8 + 2);
                        buf[NSTEPS_AT] = steps;
                        batch_event_len(usize::from(steps).min(BATCH_STEPS))
                    }
                    k if k == EventKind::TimewaitDeath as u32 => 64,
                    k if k == EventKind::Reset as u32 => 32,
                    _ => size_of::<tracer_common::TransitionEvent>(),
                };
                len = len.max(own);
                own as u32
            }
            // Whatever the input says.
            _ => u32::from_ne_bytes(buf[LEN_AT..LEN_AT + 4].try_into().unwrap()),
        };
        buf[LEN_AT..LEN_AT + 4].copy_from_slice(&claimed.to_ne_bytes());
    }
    &buf[..len]
}

fn check(bytes: &[u8]) {
    tracer_fuzz::reset();
    let decoded = decode_record(bytes);
    let mut steps = 0;
    if let Ok(Record::Batch(b)) = &decoded {
        // Validated whole: every step reads back.
        steps = b.transitions().count();
        assert_eq!(steps, b.len());
        assert!((1..=BATCH_STEPS).contains(&steps));
    }
    let spent = tracer_fuzz::allocated();
    assert_eq!(spent.bytes, 0, "decoding allocated {spent:?}");
    match decoded {
        Ok(Record::Transition(t)) => {
            // What was decoded encodes to a record that decodes to it.
            assert_eq!(decode(&encode(&t)), Ok(t));
        }
        Ok(Record::Batch(b)) => assert!(bytes.len() >= batch_event_len(steps), "{b:?}"),
        Ok(Record::TimewaitDeath(_) | Record::Reset(_)) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
