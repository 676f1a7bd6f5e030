//! The vsock queue side: connections between guest ports and Unix sockets.
//!
//! Flow control follows the specification's credit scheme. Each connection accepts at most
//! [`BUF_ALLOC`] bytes from the guest that the host socket has not taken yet; a guest that
//! sends more is refused, counted and reset. Towards the guest, bulkhead never sends more than
//! the guest's advertised free space.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use super::conn::{Conn, State};
use super::packet::{Header, HeaderError, Op, HEADER_LEN, HOST_CID};
use super::{sock, Connector, VsockBackend};
use crate::devices::virtio::chain::Chain;
use crate::devices::virtio::worker::{drain, FdChange, HandlerState, QueueContext, QueueHandler};
use crate::devices::virtio::RequestError;
use crate::telemetry::{DeviceCounter, RequestViolation};
use crate::warn_limited;

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// virtio 1.2, 5.10.6.7: the only event, "the transport was reset".
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of guest data each connection buffers for its host socket.
const BUF_ALLOC: u32 = 256 * 1024;
/// The largest payload bulkhead accepts from, or stages for, the guest in one packet.
const MAX_PAYLOAD: usize = 64 * 1024;
const LISTENER_TOKEN: u32 = 0;
/// Host-side ports for connections the host starts.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
const SHUTDOWN_BOTH: u32 = 3;
/// Control packets waiting for receive buffers: a guest that posts none while it sends can
/// not make the queue grow without bound.
const MAX_CONTROL: usize = 1024;
/// Open connections, host- and guest-started together, whatever the buffer budget.
const MAX_CONNS: usize = 1024;
/// What one connection may hold on the host's heap: the guest data its socket has not taken
/// (the credit it advertised) and one staged packet of host data.
pub const CONN_BUFFER_BYTES: u64 = BUF_ALLOC as u64 + MAX_PAYLOAD as u64;

/// The vsock device's queue side.
#[derive(Debug)]
pub struct VsockQueues {
    cid: u64,
    uds: PathBuf,
    listener: OwnedFd,
    /// Held for the VM's lifetime: the claim on the CID.
    _cid_claim: Option<OwnedFd>,
    conns: BTreeMap<u32, Conn>,
    next_token: u32,
    next_host_port: u32,
    /// Packets for the guest without payload, in order.
    control: VecDeque<Header>,
    changes: Vec<FdChange>,
    /// Connections the VM's buffer budget allows (each reserves [`CONN_BUFFER_BYTES`]).
    max_conns: usize,
    connector: Connector,
    /// Restored from a snapshot: the guest's connections are gone with the old host sockets,
    /// and it is told so with a transport reset event as soon as it gives an event buffer.
    transport_reset: bool,
}

impl VsockQueues {
    pub fn new(backend: VsockBackend) -> VsockQueues {
        let VsockBackend {
            cid,
            uds,
            listener,
            cid_claim,
            buffer_budget,
            connector,
        } = backend;
        let max_conns = usize::try_from(buffer_budget / CONN_BUFFER_BYTES)
            .unwrap_or(MAX_CONNS)
            .clamp(1, MAX_CONNS);
        VsockQueues {
            cid,
            uds,
            listener,
            _cid_claim: cid_claim,
            conns: BTreeMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            changes: Vec::new(),
            max_conns,
            connector,
            transport_reset: false,
        }
    }

    /// Sends the transport reset event, when one is owed and the driver gave a buffer for it.
    fn send_transport_reset(&mut self, ctx: &mut QueueContext<'_>) {
        if !self.transport_reset {
            return;
        }
        let Some(chain) = ctx.next_chain(EVENT, 64) else {
            return;
        };
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = if chain.write_parts(ctx.mem, &[&event]) {
            event.len() as u32
        } else {
            0
        };
        ctx.complete(EVENT, chain.head, written);
        self.transport_reset = written == 0;
    }

    fn rst_for(&self, h: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// Queues a packet for the guest; dropped (and logged) when the queue is full.
    fn queue_control(&mut self, h: Header) {
        if self.control.len() >= MAX_CONTROL {
            warn_limited!(
                "vsock: control queue full, dropped a {:?} for port {}",
                h.op,
                h.dst_port
            );
            return;
        }
        self.control.push_back(h);
    }

    /// The next token no open connection holds, above the listener's. After the counter wraps
    /// (some 4e9 connections on), a token still in use is skipped, never shared: there are at
    /// most `max_conns` of them, so the search ends.
    fn free_token(&mut self) -> u32 {
        loop {
            let token = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(LISTENER_TOKEN + 1);
            if !self.conns.contains_key(&token) {
                return token;
            }
        }
    }

    fn add_conn(&mut self, conn: Conn) -> u32 {
        let token = self.free_token();
        self.changes.push(FdChange::Add {
            fd: conn.stream.as_raw_fd(),
            token,
        });
        self.conns.insert(token, conn);
        token
    }

    fn close(&mut self, token: u32) {
        if let Some(conn) = self.conns.remove(&token) {
            self.changes.push(FdChange::Remove {
                fd: conn.stream.as_raw_fd(),
                owner: Box::new(conn.stream),
            });
        }
    }

    /// Closes the connection and tells the guest.
    fn reset_conn(&mut self, token: u32) {
        if let Some(conn) = self.conns.get(&token) {
            // A host connection that never named a port is unknown to the guest.
            if !matches!(conn.state, State::AwaitConnectLine(_)) {
                self.queue_control(header(self.cid, conn, Op::Rst, 0, 0));
            }
        }
        self.close(token);
    }

    fn find(&self, local_port: u32, peer_port: u32) -> Option<u32> {
        self.conns
            .iter()
            .find(|(_, c)| c.local_port == local_port && c.peer_port == peer_port)
            .map(|(&t, _)| t)
    }

    fn accept_all(&mut self) {
        loop {
            match sock::accept(&self.listener) {
                Ok(Some(stream)) if self.conns.len() >= self.max_conns => {
                    warn_limited!(
                        "vsock: {} connections open, all the buffer budget allows; refused a host one",
                        self.max_conns
                    );
                    drop(stream);
                }
                Ok(Some(stream)) => {
                    let conn = Conn::new(stream, State::AwaitConnectLine(Vec::new()), 0, 0);
                    self.add_conn(conn);
                }
                Ok(None) => return,
                Err(e) => {
                    warn_limited!("vsock: accept on {} failed: {e}", self.uds.display());
                    return;
                }
            }
        }
    }

    /// Reads a host connection's `CONNECT <port>\n`, one byte at a time so nothing after the
    /// line is consumed, and asks the guest to accept it.
    fn read_connect_line(&mut self, token: u32) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let State::AwaitConnectLine(line) = &mut conn.state else {
            return;
        };
        let mut byte = [0u8];
        let port = loop {
            match conn.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => {
                    break std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| l.strip_prefix("CONNECT "))
                        .and_then(|p| p.trim().parse::<u32>().ok());
                }
                Ok(_) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(peer_port) = port else {
            self.close(token);
            return;
        };
        let local_port = self.next_host_port;
        self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.state = State::AwaitResponse;
            conn.local_port = local_port;
            conn.peer_port = peer_port;
        }
        if let Some(conn) = self.conns.get(&token) {
            self.queue_control(header(self.cid, conn, Op::Request, 0, 0));
        }
    }

    fn socket_event(&mut self, ctx: Option<&mut QueueContext<'_>>, token: u32) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match conn.state {
            // Before the driver is ready the request waits in the control queue.
            State::AwaitConnectLine(_) => self.read_connect_line(token),
            State::AwaitResponse => {}
            State::Established => {
                conn.readable = true;
                let flushed = conn.flush();
                if flushed.is_err() || (conn.closing && conn.out.is_empty()) {
                    self.reset_conn(token);
                }
            }
        }
        if let Some(ctx) = ctx {
            self.receive(ctx);
        }
    }

    /// Serves the guest's packets.
    fn transmit(&mut self, ctx: &mut QueueContext<'_>) {
        drain(ctx, TX, |ctx| {
            while let Some(chain) = ctx.next_chain(TX, (HEADER_LEN + MAX_PAYLOAD) as u64) {
                if let Err(reason) = self.packet(ctx, &chain) {
                    ctx.refuse(reason);
                }
                ctx.complete(TX, chain.head, 0);
            }
        });
    }

    fn packet(&mut self, ctx: &QueueContext<'_>, chain: &Chain) -> Result<(), RequestError> {
        if chain.writable_len() > 0 {
            return Err(RequestViolation::UnexpectedWritable.into());
        }
        let mut bytes = Vec::with_capacity(chain.readable_len() as usize);
        if !chain.read_into(ctx.mem, &mut bytes) {
            return Err(RequestViolation::HostIo.into());
        }
        let (head, payload) = bytes.split_at(bytes.len().min(HEADER_LEN));
        let h = Header::parse(head, payload.len() as u64, self.cid).map_err(|e| match e {
            HeaderError::Short => {
                RequestError::new(RequestViolation::BadHeader, 0, head.len() as u64)
            }
            HeaderError::Unknown => RequestViolation::Unsupported.into(),
            HeaderError::WrongCid => {
                // The evidence: the CIDs the guest claimed (src_cid and dst_cid lead the header).
                let cid = |at: usize| {
                    head.get(at..at + 8)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map_or(0, u64::from_le_bytes)
                };
                RequestError::new(RequestViolation::WrongCid, cid(0), cid(8))
            }
            HeaderError::BadLength => {
                RequestError::new(RequestViolation::BadLength, 0, payload.len() as u64)
            }
        })?;
        let token = self.find(h.dst_port, h.src_port);
        if let Some(conn) = token.and_then(|t| self.conns.get_mut(&t)) {
            conn.peer_buf_alloc = h.buf_alloc;
            conn.peer_fwd_cnt = h.fwd_cnt;
        }
        match (h.op, token) {
            (Op::Request, None) => self.guest_connect(&h),
            (Op::Request, Some(t)) => self.reset_conn(t),
            (Op::Response, Some(t)) => self.established(t),
            (Op::Rw, Some(t)) => return self.guest_data(t, payload, ctx),
            (Op::CreditUpdate, Some(_)) => {}
            (Op::CreditRequest, Some(t)) => {
                if let Some(conn) = self.conns.get_mut(&t) {
                    conn.fwd_cnt_told = conn.fwd_cnt;
                }
                if let Some(conn) = self.conns.get(&t) {
                    self.queue_control(header(self.cid, conn, Op::CreditUpdate, 0, 0));
                }
            }
            // A guest shutting down either direction ends the connection here (bulkhead
            // does not keep half-closed streams), once what the guest sent before has reached
            // the host socket: the end of a stream is never cut off.
            (Op::Shutdown, Some(t)) => match self.conns.get_mut(&t) {
                Some(conn) if !conn.out.is_empty() => conn.closing = true,
                _ => self.reset_conn(t),
            },
            (Op::Rst, Some(t)) => self.close(t),
            (Op::Rst, None) => {}
            (_, None) => self.queue_control(self.rst_for(&h)),
        }
        Ok(())
    }

    /// The guest connects to host port P: the socket `uds_P`.
    fn guest_connect(&mut self, h: &Header) {
        if self.conns.len() >= self.max_conns {
            warn_limited!(
                "vsock: {} connections open, all the buffer budget allows; refused a guest one",
                self.max_conns
            );
            self.queue_control(self.rst_for(h));
            return;
        }
        let connected = match &mut self.connector {
            Connector::Direct => {
                let mut path = self.uds.clone().into_os_string();
                path.push(format!("_{}", h.dst_port));
                sock::connect(std::path::Path::new(&path))
            }
            Connector::Broker(broker) => broker.connect(h.dst_port),
        };
        match connected {
            Ok(stream) => {
                let mut conn = Conn::new(stream, State::Established, h.dst_port, h.src_port);
                conn.peer_buf_alloc = h.buf_alloc;
                conn.peer_fwd_cnt = h.fwd_cnt;
                let response = header(self.cid, &conn, Op::Response, 0, 0);
                self.add_conn(conn);
                self.queue_control(response);
            }
            Err(_) => self.queue_control(self.rst_for(h)),
        }
    }

    fn established(&mut self, token: u32) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.state != State::AwaitResponse {
            self.reset_conn(token);
            return;
        }
        conn.state = State::Established;
        conn.out
            .extend_from_slice(format!("OK {}\n", conn.local_port).as_bytes());
        // The OK line is not guest data: it does not count towards fwd_cnt.
        let line_len = conn.out.len() as u32;
        let before = conn.fwd_cnt;
        let failed = conn.flush().is_err();
        let written = conn.fwd_cnt.wrapping_sub(before).min(line_len);
        conn.fwd_cnt = conn.fwd_cnt.wrapping_sub(written);
        if failed || written < line_len {
            // A host socket that can not take 20 bytes at once is not worth waiting for.
            self.reset_conn(token);
        }
    }

    fn guest_data(
        &mut self,
        token: u32,
        payload: &[u8],
        ctx: &QueueContext<'_>,
    ) -> Result<(), RequestError> {
        let Some(conn) = self.conns.get_mut(&token) else {
            return Ok(());
        };
        // Data after the guest's own shutdown, or before the connection is up, ends it.
        if conn.state != State::Established || conn.closing {
            self.reset_conn(token);
            return Ok(());
        }
        let wanted = conn.out.len() + payload.len();
        if wanted > BUF_ALLOC as usize {
            self.reset_conn(token);
            return Err(RequestError::new(
                RequestViolation::CreditOverrun,
                u64::from(BUF_ALLOC),
                wanted as u64,
            ));
        }
        // Exactly what it holds: capacity the budget did not reserve is never allocated.
        conn.out.reserve_exact(payload.len());
        conn.out.extend_from_slice(payload);
        // Through the context: the bytes count against the wakeup's budget.
        ctx.add(DeviceCounter::BytesFromGuest, payload.len() as u64);
        if conn.flush().is_err() {
            self.reset_conn(token);
            return Ok(());
        }
        // Tell the guest about freed space before it runs out, not after.
        if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_told) >= BUF_ALLOC / 4 {
            conn.fwd_cnt_told = conn.fwd_cnt;
            let update = header(self.cid, conn, Op::CreditUpdate, 0, 0);
            self.queue_control(update);
        }
        Ok(())
    }

    /// Fills receive buffers: control packets first, then data from the host sockets.
    fn receive(&mut self, ctx: &mut QueueContext<'_>) {
        if !self.flush_control(ctx) {
            return;
        }
        let tokens: Vec<u32> = self.conns.keys().copied().collect();
        for token in tokens {
            if !self.send_data(ctx, token) {
                return;
            }
        }
    }

    /// Sends what host socket `token` has, within the guest's credit. False when the guest
    /// has no receive buffer left.
    fn send_data(&mut self, ctx: &mut QueueContext<'_>, token: u32) -> bool {
        loop {
            let Some(conn) = self.conns.get_mut(&token) else {
                return true;
            };
            if conn.state != State::Established {
                return true;
            }
            let credit = conn.peer_credit() as usize;
            if conn.staged.is_empty() && conn.readable && credit > 0 {
                let mut buf = vec![0u8; credit.min(MAX_PAYLOAD)];
                match conn.stream.read(&mut buf) {
                    Ok(0) => {
                        // The host closed its end.
                        let h = header(self.cid, conn, Op::Shutdown, 0, SHUTDOWN_BOTH);
                        self.queue_control(h);
                        self.close(token);
                        return self.flush_control(ctx);
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        conn.staged = buf;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => conn.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.reset_conn(token);
                        return true;
                    }
                }
            }
            let Some(conn) = self.conns.get_mut(&token) else {
                return true;
            };
            if conn.staged.is_empty() || credit == 0 {
                return true;
            }
            let Some(chain) = ctx.next_chain(RX, u64::MAX) else {
                return false;
            };
            let room = (chain.writable_len() as usize).saturating_sub(HEADER_LEN);
            let n = conn.staged.len().min(room).min(credit);
            if n == 0 {
                ctx.complete(RX, chain.head, 0);
                continue;
            }
            conn.fwd_cnt_told = conn.fwd_cnt;
            let h = header(self.cid, conn, Op::Rw, n as u32, 0);
            let conn = match self.conns.get_mut(&token) {
                Some(c) => c,
                None => return true,
            };
            let data: Vec<u8> = conn.staged.drain(..n).collect();
            let written = write_packet(ctx, &chain, &h, &data);
            ctx.complete(RX, chain.head, written);
            if written > 0 {
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                ctx.add(DeviceCounter::BytesToGuest, n as u64);
            }
        }
    }

    /// Sends the queued control packets. False when the guest ran out of receive buffers.
    fn flush_control(&mut self, ctx: &mut QueueContext<'_>) -> bool {
        while let Some(h) = self.control.front().copied() {
            let Some(chain) = ctx.next_chain(RX, u64::MAX) else {
                return false;
            };
            let written = write_packet(ctx, &chain, &h, &[]);
            ctx.complete(RX, chain.head, written);
            if written > 0 {
                self.control.pop_front();
            }
        }
        true
    }
}

/// A packet to the guest (CID `cid`) on `conn`, carrying our current credit.
fn header(cid: u64, conn: &Conn, op: Op, len: u32, flags: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: conn.local_port,
        dst_port: conn.peer_port,
        len,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: conn.fwd_cnt,
    }
}

/// Writes a header and payload into a receive chain; the bytes written, or 0 when the chain
/// is not a receive buffer that can hold them (it then goes back empty).
fn write_packet(ctx: &QueueContext<'_>, chain: &Chain, h: &Header, payload: &[u8]) -> u32 {
    if chain.readable_len() > 0 {
        ctx.refuse(RequestViolation::UnexpectedReadable);
        return 0;
    }
    // Refused when the packet does not fit the chain's writable buffers.
    if !chain.write_parts(ctx.mem, &[&h.encode(), payload]) {
        ctx.add(DeviceCounter::Dropped, 1);
        return 0;
    }
    (HEADER_LEN + payload.len()) as u32
}

impl QueueHandler for VsockQueues {
    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, queue: usize) {
        match queue {
            TX => {
                self.transmit(ctx);
                self.receive(ctx);
            }
            RX => self.receive(ctx),
            // The event queue only carries transport resets, sent after a restore.
            _ => self.send_transport_reset(ctx),
        }
    }

    fn activated(&mut self, ctx: &mut QueueContext<'_>) {
        self.send_transport_reset(ctx);
        self.accept_all();
        self.receive(ctx);
    }

    fn restore_state(&mut self, state: &HandlerState) -> bool {
        // Connections are not saved: their host ends belong to the VM that was snapshotted.
        self.transport_reset = state.live;
        true
    }

    fn reset(&mut self) {
        let tokens: Vec<u32> = self.conns.keys().copied().collect();
        for token in tokens {
            self.close(token);
        }
        self.control.clear();
    }

    fn backend_fds(&self) -> Vec<(RawFd, u32)> {
        vec![(self.listener.as_raw_fd(), LISTENER_TOKEN)]
    }

    fn backend_ready(&mut self, ctx: Option<&mut QueueContext<'_>>, token: u32) {
        if token == LISTENER_TOKEN {
            // Each accepted socket reports its own readiness once the worker watches it
            // (edge-triggered registration reports what is already pending).
            self.accept_all();
            return;
        }
        self.socket_event(ctx, token);
    }

    fn fd_changes(&mut self) -> Vec<FdChange> {
        std::mem::take(&mut self.changes)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::devices::virtio::vsock::conn::State;

    #[test]
    fn tokens_that_wrap_skip_the_ones_still_open_and_stay_above_the_listener() {
        let uds = std::env::temp_dir().join(format!("bulkhead-token-{}", std::process::id()));
        let _ = std::fs::remove_file(&uds);
        let backend = VsockBackend::open(7, &uds, false).unwrap();
        let mut q = VsockQueues::new(backend);
        let conn = || Conn::new(UnixStream::pair().unwrap().0, State::Established, 1, 2);
        // The first token after the listener is still open when the counter wraps to it.
        let first = q.add_conn(conn());
        assert_eq!(first, LISTENER_TOKEN + 1);
        q.next_token = u32::MAX;
        assert_eq!(q.add_conn(conn()), u32::MAX);
        let after_wrap = q.add_conn(conn());
        assert_eq!(
            after_wrap,
            LISTENER_TOKEN + 2,
            "the open token {first} was reused"
        );
        assert_eq!(q.conns.len(), 3);
        let _ = std::fs::remove_file(&uds);
    }

    #[test]
    fn the_buffer_budget_caps_connections_from_either_side() {
        let uds = std::env::temp_dir().join(format!("bulkhead-budget-{}", std::process::id()));
        let _ = std::fs::remove_file(&uds);
        let backend = VsockBackend::open(7, &uds, false)
            .unwrap()
            .with_buffer_budget(2 * CONN_BUFFER_BYTES + 1);
        let mut q = VsockQueues::new(backend);
        assert_eq!(q.max_conns, 2);
        // Two host connections are taken, the third is closed at once.
        let hosts: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&uds).unwrap()).collect();
        q.accept_all();
        assert_eq!(q.conns.len(), 2);
        let mut third = &hosts[2];
        let mut buf = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut third, &mut buf).unwrap(),
            0,
            "not closed"
        );
        // A guest connection now gets a reset.
        let request = Header {
            src_cid: 7,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 5000,
            len: 0,
            op: Op::Request,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        };
        q.guest_connect(&request);
        assert_eq!(q.conns.len(), 2);
        assert_eq!(q.control.back().map(|h| h.op), Some(Op::Rst));
        // The budget can not go below one connection, nor above the hard cap.
        let tiny = VsockBackend::open(7, &uds.with_extension("t"), false).unwrap();
        assert_eq!(VsockQueues::new(tiny.with_buffer_budget(0)).max_conns, 1);
        let _ = std::fs::remove_file(&uds);
        let _ = std::fs::remove_file(uds.with_extension("t"));
    }
}
