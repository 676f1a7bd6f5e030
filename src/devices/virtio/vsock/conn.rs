//! One vsock connection: its state, its host socket and both directions' credit.

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum State {
    /// A host connection that has not yet said which guest port it wants.
    AwaitConnectLine(Vec<u8>),
    /// REQUEST sent to the guest, waiting for its RESPONSE.
    AwaitResponse,
    Established,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) state: State,
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    /// Guest data the host socket has not taken yet.
    pub(super) out: Vec<u8>,
    /// Bytes of guest data written to the host socket.
    pub(super) fwd_cnt: u32,
    /// `fwd_cnt` when the guest last heard it.
    pub(super) fwd_cnt_told: u32,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub(super) tx_cnt: u32,
    /// Host data read from the socket, waiting for a receive buffer.
    pub(super) staged: Vec<u8>,
    /// The socket may have more to read.
    pub(super) readable: bool,
    /// The guest shut the connection down with data still to pass on: it ends once `out` is
    /// flushed.
    pub(super) closing: bool,
}

impl Conn {
    pub(super) fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            out: Vec::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            staged: Vec::new(),
            readable: true,
            closing: false,
        }
    }

    /// What the guest can still take.
    pub(super) fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes buffered guest data to the socket. Err when the socket is gone.
    pub(super) fn flush(&mut self) -> std::io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn conn() -> (Conn, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (Conn::new(ours, State::Established, 5000, 4000), theirs)
    }

    #[test]
    fn the_guest_gets_no_more_than_its_advertised_free_space() {
        let (mut c, _) = conn();
        assert_eq!(c.peer_credit(), 0, "nothing advertised yet");
        c.peer_buf_alloc = 100;
        c.tx_cnt = 30;
        c.peer_fwd_cnt = 10;
        assert_eq!(c.peer_credit(), 80);
        // Counters wrap: 2^32 - 5 sent, 2^32 - 15 consumed, still 10 in flight.
        c.tx_cnt = u32::MAX - 4;
        c.peer_fwd_cnt = u32::MAX - 14;
        assert_eq!(c.peer_credit(), 90);
        // A guest claiming to have consumed more than it was sent gets nothing.
        c.tx_cnt = 5;
        c.peer_fwd_cnt = 6;
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn flushing_forwards_what_the_host_socket_takes_and_keeps_the_rest() {
        let (mut c, mut theirs) = conn();
        c.out.extend_from_slice(b"hello");
        c.flush().unwrap();
        assert!(c.out.is_empty());
        assert_eq!(c.fwd_cnt, 5);
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // A host that stops reading: the socket fills, the rest waits in `out`.
        c.out = vec![7u8; 4 << 20];
        c.flush().unwrap();
        assert!(!c.out.is_empty() && c.out.len() < 4 << 20);
        assert_eq!(c.fwd_cnt as usize + c.out.len(), 5 + (4 << 20));
        drop(theirs);
        assert!(c.flush().is_err(), "a closed host socket is an error");
    }
}
