//! Converts the kernel's CLOCK_MONOTONIC timestamps (`bpf_ktime_get_ns`)
//! into wall-clock time, with the offset between the two clocks taken once
//! at start (a later step of the wall clock is not followed).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Wall-clock ns since the epoch minus monotonic ns, at start.
    offset_ns: i128,
}

pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl WallClock {
    pub fn now() -> Self {
        // Bracket the wall-clock read by two monotonic reads and use their
        // midpoint, so the offset's error is half the bracket (~100 ns).
        let m1 = monotonic_ns();
        let wall = clock_ns(libc::CLOCK_REALTIME);
        let m2 = monotonic_ns();
        WallClock {
            offset_ns: wall as i128 - (m1 as i128 + m2 as i128) / 2,
        }
    }

    /// A clock with a fixed offset, for tests.
    pub fn with_offset_ns(offset_ns: i128) -> Self {
        WallClock { offset_ns }
    }

    /// Wall-clock nanoseconds since the epoch of `mono_ns` (0 before it).
    pub fn wall_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).clamp(0, u64::MAX as i128) as u64
    }

    pub fn to_system_time(&self, mono_ns: u64) -> SystemTime {
        let ns = u128::from(self.wall_ns(mono_ns));
        UNIX_EPOCH + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
    }

    /// RFC 3339, UTC, nanoseconds: `2026-11-23T20:15:01.123456789Z`.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        self.rfc3339_display(mono_ns).to_string()
    }

    /// The same, as a `Display` value (no allocation).
    pub fn rfc3339_display(&self, mono_ns: u64) -> humantime::Rfc3339Timestamp {
        humantime::format_rfc3339_nanos(self.to_system_time(mono_ns))
    }
}
