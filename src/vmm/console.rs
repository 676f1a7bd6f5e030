//! The guest's serial console on the host side: input from the terminal or a pipe, and the
//! terminal's raw mode while the VM runs.

use std::fs::File;
use std::sync::Arc;

use crate::devices::legacy::SerialPort;

/// Console input: where it comes from and which UART it feeds.
pub struct ConsoleInput {
    pub source: File,
    pub serial: Arc<SerialPort>,
}

/// Puts a terminal in raw mode so every keystroke (Ctrl-C included) reaches the guest, and
/// restores its settings when dropped.
pub struct RawTerminal {
    fd: libc::c_int,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd`, or None when it is not a terminal, or bulkhead is not its foreground
    /// job (the kernel would stop a background job that sets a terminal's modes).
    pub fn new(fd: libc::c_int) -> Option<RawTerminal> {
        // SAFETY: isatty, tcgetpgrp and getpgrp only inspect the descriptor and the process.
        if unsafe { libc::isatty(fd) != 1 || libc::tcgetpgrp(fd) != libc::getpgrp() } {
            return None;
        }
        // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the terminal's own settings.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` holds the settings read from this same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
