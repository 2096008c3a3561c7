//! A pseudo-terminal for `tracer top` in the bench: the live view needs a
//! terminal to draw on, and the bench measures what drawing costs. The
//! bench reads the terminal's output and throws it away, as a terminal
//! emulator would consume it.

use std::{
    fs::{self, File},
    io::Read as _,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::PathBuf,
    process::Command,
    thread,
};

use anyhow::{Context as _, Result};

/// A new terminal of `columns` x `rows`: its slave side (for the child)
/// and its master side (for the reader).
pub(super) fn open(columns: u16, rows: u16) -> Result<(OwnedFd, File)> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: out-parameters for two fds; no name buffer, default modes,
    // a valid winsize.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("openpty");
    }
    // SAFETY: openpty returned two fds that nothing else owns.
    let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    Ok((slave, master))
}

/// Makes `terminal` the command's stdin and stdout and its controlling
/// terminal (crossterm opens /dev/tty for raw mode and the window size:
/// without this it would find the bench's own terminal, if any).
pub(super) fn attach(cmd: &mut Command, terminal: &OwnedFd) -> Result<()> {
    cmd.stdin(terminal.try_clone()?)
        .stdout(terminal.try_clone()?);
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Reads the terminal until its last user closes it (the read fails with
/// EIO), then writes the number of bytes read to `count_to`.
pub(super) fn drain(mut master: File, count_to: PathBuf) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        while let Ok(n @ 1..) = master.read(&mut buf) {
            total += n as u64;
        }
        let _ = fs::write(count_to, total.to_string());
    })
}
