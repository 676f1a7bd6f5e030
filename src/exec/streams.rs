//! The host's end of the guest's three vsock streams: the command's stdout and stderr, copied
//! as they come to this process's own, and the status stream, on which the guest's init says
//! how the command ended. The host listens before the VM starts (guest connections to host
//! port P arrive on the socket `UDS_P`), so the guest never waits for an agent.
//!
//! The status is taken only once both output streams have ended: init shuts them down after
//! the command's last write and before it sends the status, so every byte is here first. The
//! host then closes the status stream, which tells init to power off.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

pub const PORT_STDOUT: u32 = 10240;
pub const PORT_STDERR: u32 = 10241;
pub const PORT_STATUS: u32 = 10242;
/// The longest status line init writes ("error " and a message).
const MAX_STATUS_LINE: u64 = 1024;

/// How the command ended, as the guest's init reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It exited with this status.
    Exit(i32),
    /// A signal killed it.
    Signal(i32),
    /// It never ran: init says why.
    NotRun(String),
}

impl Ending {
    /// Parses init's status line; None for anything else.
    pub fn parse(line: &str) -> Option<Ending> {
        let (kind, rest) = line.trim_end_matches('\n').split_once(' ')?;
        match kind {
            "exit" => rest
                .parse()
                .ok()
                .filter(|s| (0..=255).contains(s))
                .map(Ending::Exit),
            "signal" => rest
                .parse()
                .ok()
                .filter(|s| (1..=64).contains(s))
                .map(Ending::Signal),
            "error" => Some(Ending::NotRun(rest.to_string())),
            _ => None,
        }
    }

    /// The status `bulkhead exec` exits with, as a shell reports a command's.
    pub fn status(&self) -> Option<i32> {
        match self {
            Ending::Exit(s) => Some(*s),
            Ending::Signal(s) => Some(128 + s),
            Ending::NotRun(_) => None,
        }
    }
}

/// The three listening sockets, bound before the VM starts.
pub struct Listening {
    out: UnixListener,
    err: UnixListener,
    status: UnixListener,
    paths: [PathBuf; 3],
}

impl Listening {
    /// Binds `UDS_P` for each of the three ports of the VM whose vsock socket is `uds`.
    pub fn bind(uds: &Path) -> std::io::Result<Listening> {
        let path = |port: u32| PathBuf::from(format!("{}_{port}", uds.display()));
        let paths = [path(PORT_STDOUT), path(PORT_STDERR), path(PORT_STATUS)];
        Ok(Listening {
            out: UnixListener::bind(&paths[0])?,
            err: UnixListener::bind(&paths[1])?,
            status: UnixListener::bind(&paths[2])?,
            paths,
        })
    }

    /// Starts copying: stdout and stderr to `stdout` and `stderr` as they arrive.
    pub fn serve(
        self,
        stdout: impl Write + Send + 'static,
        stderr: impl Write + Send + 'static,
    ) -> Serving {
        let out = std::thread::Builder::new()
            .name("exec-stdout".into())
            .spawn(move || pump(&self.out, stdout));
        let err = std::thread::Builder::new()
            .name("exec-stderr".into())
            .spawn(move || pump(&self.err, stderr));
        let status_listener = self.status;
        let status = std::thread::Builder::new()
            .name("exec-status".into())
            .spawn(move || {
                let stream = status_listener.accept().ok().map(|(s, _)| s);
                let ending = stream.as_ref().and_then(read_status);
                (stream, ending)
            });
        Serving {
            out: out.ok(),
            err: err.ok(),
            status: status.ok(),
            paths: self.paths,
        }
    }
}

/// Accepts one connection on `listener` and copies it to `to` until it ends.
fn pump(listener: &UnixListener, mut to: impl Write) {
    let Ok((mut stream, _)) = listener.accept() else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // A reader that went away (a closed pipe) must not stall the guest: keep
                // draining.
                if let Some(chunk) = buf.get(..n) {
                    let _ = to.write_all(chunk).and_then(|()| to.flush());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn read_status(stream: &UnixStream) -> Option<Ending> {
    let mut line = String::new();
    BufReader::new(stream.take(MAX_STATUS_LINE))
        .read_line(&mut line)
        .ok()?;
    Ending::parse(&line)
}

/// The copying threads.
pub struct Serving {
    out: Option<JoinHandle<()>>,
    err: Option<JoinHandle<()>>,
    status: Option<JoinHandle<(Option<UnixStream>, Option<Ending>)>>,
    paths: [PathBuf; 3],
}

impl Serving {
    /// Waits for the status and for both output streams to end, then closes the status
    /// stream (init powers off). Returns the status, or None if the guest never sent one.
    /// Called while the VM runs; returns when the guest is done or the VM has ended (the VM
    /// process's end closes every connection).
    pub fn wait_for_status(&mut self) -> Option<Ending> {
        let (stream, ending) = self.status.take()?.join().ok()?;
        if ending.is_some() {
            self.join_output();
        }
        drop(stream);
        ending
    }

    /// The three sockets' paths: a connection to each ends an accept still waiting.
    pub fn paths(&self) -> &[PathBuf; 3] {
        &self.paths
    }

    fn join_output(&mut self) {
        for handle in [self.out.take(), self.err.take()].into_iter().flatten() {
            let _ = handle.join();
        }
    }

    /// After the VM has ended: wakes every thread still waiting for a connection that will
    /// never come, and waits for all of them.
    pub fn finish(mut self) -> Option<Ending> {
        for path in &self.paths {
            // An empty connection ends an accept that is still waiting.
            let _ = UnixStream::connect(path);
        }
        let ending = self.wait_for_status();
        self.join_output();
        for path in &self.paths {
            let _ = std::fs::remove_file(path);
        }
        ending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_exit_signal_or_error_and_nothing_else() {
        assert_eq!(Ending::parse("exit 7\n"), Some(Ending::Exit(7)));
        assert_eq!(Ending::parse("signal 9\n"), Some(Ending::Signal(9)));
        assert_eq!(Ending::Signal(9).status(), Some(137));
        assert_eq!(
            Ending::parse("error mount root: No such device\n"),
            Some(Ending::NotRun("mount root: No such device".into()))
        );
        for bad in [
            "", "exit", "exit 256", "exit -1", "signal 0", "quit 1", "exit 7x",
        ] {
            assert_eq!(Ending::parse(bad), None, "{bad:?}");
        }
    }
}
