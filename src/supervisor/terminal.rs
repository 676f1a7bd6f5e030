//! The operator's terminal: the VM process puts a terminal console in raw mode and restores it
//! when it ends; when it is killed instead, the supervisor puts back what it found.

use crate::config::ConsoleConfig;

/// A terminal's settings, saved before the VM process could change them.
pub struct SavedTerminal {
    fd: libc::c_int,
    termios: libc::termios,
    /// The process group of `bulkhead run` (and of its VM process).
    group: libc::pid_t,
}

impl SavedTerminal {
    /// The settings of `fd` when it is a terminal the VM process will use as its console.
    pub fn save(fd: libc::c_int, console: &ConsoleConfig) -> Option<SavedTerminal> {
        if *console != ConsoleConfig::Stdio {
            return None;
        }
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        let termios = settings(fd)?;
        // SAFETY: getpgrp has no preconditions.
        let group = unsafe { libc::getpgrp() };
        Some(SavedTerminal { fd, termios, group })
    }

    /// Puts the saved settings back if they were changed. Only the foreground job may set a
    /// terminal's modes (the kernel stops a background one with SIGTTOU), and a terminal left
    /// as found needs nothing.
    pub fn restore(&self) {
        // SAFETY: tcgetpgrp only reads the terminal's foreground process group.
        if unsafe { libc::tcgetpgrp(self.fd) } != self.group {
            return;
        }
        if settings(self.fd).is_some_and(|now| same(&now, &self.termios)) {
            return;
        }
        // SAFETY: `termios` holds settings read from this same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.termios) };
    }
}

fn settings(fd: libc::c_int) -> Option<libc::termios> {
    // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `termios` is valid for writes.
    (unsafe { libc::tcgetattr(fd, &mut termios) } == 0).then_some(termios)
}

fn same(a: &libc::termios, b: &libc::termios) -> bool {
    (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag, a.c_cc)
        == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag, b.c_cc)
}
