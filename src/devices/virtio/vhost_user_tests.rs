//! The frontend against a mock backend on a real socket: the mock reads the vhost-user wire
//! format itself (not the `vhost` crate's backend), answers the requests that need an
//! answer, and keeps what it was told, so each test checks what a backend would see.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vm_memory::Bytes;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::vstate::memory::{create_guest_memory, Backing};

const VERSION_1: u64 = 1 << 32;
const MQ: u64 = 0x1;
const REPLY_ACK: u64 = 0x8;

/// What the mock backend was told.
#[derive(Default)]
struct Seen {
    requests: Vec<u32>,
    features: Option<u64>,
    protocol: Option<u64>,
    /// (guest address, size, frontend's address, offset) of each region, and its descriptor.
    regions: Vec<(u64, u64, u64, u64)>,
    mem_fd: Option<File>,
    num: Vec<(u32, u32)>,
    /// (queue, descriptor table, used ring, available ring), frontend addresses.
    addrs: Vec<(u32, u64, u64, u64)>,
    kick: Option<File>,
    call: Option<File>,
    enabled: Vec<(u32, u32)>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Serves one frontend until it hangs up: offers `features`, `protocol` and `queues`.
fn mock(listener: UnixListener, features: u64, protocol: u64, queues: u64) -> Seen {
    let (mut s, _) = listener.accept().unwrap();
    let mut seen = Seen::default();
    loop {
        let mut hdr = [0u8; 12];
        let (n, fd) = s.recv_with_fd(&mut hdr).unwrap();
        if n == 0 {
            return seen;
        }
        assert_eq!(n, 12, "a whole header");
        let (req, size) = (u32_at(&hdr, 0), u32_at(&hdr, 8) as usize);
        assert_eq!(u32_at(&hdr, 4) & 0x3, 1, "protocol version 1");
        let mut body = vec![0u8; size];
        s.read_exact(&mut body).unwrap();
        seen.requests.push(req);
        let reply = match req {
            1 => Some(features),
            15 => Some(protocol),
            17 => Some(queues),
            // GET_VRING_BASE: the queue asked for, and where the backend stopped (7).
            11 => Some(u64::from(u32_at(&body, 0)) | 7 << 32),
            2 => {
                seen.features = Some(u64_at(&body, 0));
                None
            }
            16 => {
                seen.protocol = Some(u64_at(&body, 0));
                None
            }
            5 => {
                let count = u32_at(&body, 0) as usize;
                for i in 0..count {
                    let at = 8 + i * 32;
                    seen.regions.push((
                        u64_at(&body, at),
                        u64_at(&body, at + 8),
                        u64_at(&body, at + 16),
                        u64_at(&body, at + 24),
                    ));
                }
                seen.mem_fd = fd;
                None
            }
            8 => {
                seen.num.push((u32_at(&body, 0), u32_at(&body, 4)));
                None
            }
            9 => {
                seen.addrs.push((
                    u32_at(&body, 0),
                    u64_at(&body, 8),
                    u64_at(&body, 16),
                    u64_at(&body, 24),
                ));
                None
            }
            12 => {
                seen.kick = fd;
                None
            }
            13 => {
                seen.call = fd;
                None
            }
            18 => {
                seen.enabled.push((u32_at(&body, 0), u32_at(&body, 4)));
                None
            }
            _ => None,
        };
        if let Some(value) = reply {
            let mut msg = Vec::new();
            msg.extend_from_slice(&req.to_le_bytes());
            msg.extend_from_slice(&(1u32 | 0x4).to_le_bytes());
            msg.extend_from_slice(&8u32.to_le_bytes());
            msg.extend_from_slice(&value.to_le_bytes());
            s.write_all(&msg).unwrap();
        }
    }
}

fn socket(name: &str) -> (PathBuf, UnixListener) {
    let path =
        std::env::temp_dir().join(format!("bulkhead-vhost-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    (path, listener)
}

fn queue<'a>(kick: &'a EventFd, call: &'a EventFd, desc: u64) -> Vec<BackendQueue<'a>> {
    vec![BackendQueue {
        config: QueueConfig {
            size: 128,
            desc_table: desc,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        },
        kick,
        call,
    }]
}

#[test]
fn a_backend_maps_the_guests_ram_from_the_table_and_finds_each_ring_and_eventfd() {
    let (path, listener) = socket("whole");
    let backend = std::thread::spawn(move || {
        mock(
            listener,
            VERSION_1 | PROTOCOL_FEATURES_BIT,
            MQ | REPLY_ACK,
            2,
        )
    });
    let mem = create_guest_memory(16 << 20, Backing::Shared, false).unwrap();
    mem.write_slice(b"descriptors", GuestAddress(0x1000))
        .unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let mut b = Backend::connect(&path, 1).unwrap();
    assert_eq!(
        b.features(),
        VERSION_1,
        "the vhost-user bit is not the guest's"
    );
    b.activate(VERSION_1, &mem, &queue(&kick, &call, 0x1000))
        .unwrap();
    drop(b);
    let seen = backend.join().unwrap();
    let _ = std::fs::remove_file(&path);

    assert_eq!(seen.requests[..2], [3, 1], "SET_OWNER, then GET_FEATURES");
    assert_eq!(seen.features, Some(VERSION_1 | PROTOCOL_FEATURES_BIT));
    assert_eq!(
        seen.protocol,
        Some(MQ),
        "no reply acks: only what is needed"
    );
    assert_eq!(seen.regions.len(), 1);
    let (gpa, size, uaddr, offset) = seen.regions[0];
    assert_eq!((gpa, size, offset), (0, 16 << 20, 0));
    // The backend reads what the guest wrote through the descriptor it was given, and the
    // ring address it got translates to the same place through the table.
    let fd = seen.mem_fd.expect("no memory descriptor");
    let (_, desc, used, avail) = seen.addrs[0];
    let mut buf = [0u8; 11];
    fd.read_exact_at(&mut buf, desc - uaddr + offset).unwrap();
    assert_eq!(&buf, b"descriptors");
    assert_eq!((avail - uaddr, used - uaddr), (0x2000, 0x3000));
    assert_eq!(seen.num, [(0, 128)]);
    assert_eq!(seen.enabled, [(0, 1)]);
    // The guest's notifications reach the backend, and its interrupts come back.
    kick.write(1).unwrap();
    let mut word = [0u8; 8];
    seen.kick
        .expect("no kick fd")
        .read_exact(&mut word)
        .unwrap();
    seen.call
        .expect("no call fd")
        .write_all(&1u64.to_le_bytes())
        .unwrap();
    assert_eq!(call.read().unwrap(), 1);
}

#[test]
fn a_ring_outside_ram_or_private_ram_is_refused_before_the_backend_sees_the_queue() {
    let (path, listener) = socket("refuse");
    let backend = std::thread::spawn(move || mock(listener, VERSION_1, 0, 1));
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let mut b = Backend::connect(&path, 1).unwrap();
    let private = create_guest_memory(16 << 20, Backing::Private, false).unwrap();
    assert!(matches!(
        b.activate(VERSION_1, &private, &queue(&kick, &call, 0x1000)),
        Err(VhostUserError::NotShared(0))
    ));
    let shared = create_guest_memory(16 << 20, Backing::Shared, false).unwrap();
    let err = b
        .activate(VERSION_1, &shared, &queue(&kick, &call, 32 << 20))
        .unwrap_err();
    assert!(
        matches!(
            err,
            VhostUserError::Ring {
                queue: 0,
                ring: "descriptor table",
                ..
            }
        ),
        "{err}"
    );
    drop(b);
    let seen = backend.join().unwrap();
    let _ = std::fs::remove_file(&path);
    // Without VHOST_USER_F_PROTOCOL_FEATURES nothing about protocol features is asked.
    assert!(!seen.requests.contains(&15));
    for vring in [8, 9, 10, 12, 13] {
        assert!(!seen.requests.contains(&vring), "request {vring} was sent");
    }
}

#[test]
fn a_backend_with_too_few_queues_is_refused_at_connect() {
    let (path, listener) = socket("queues");
    let backend =
        std::thread::spawn(move || mock(listener, VERSION_1 | PROTOCOL_FEATURES_BIT, MQ, 1));
    let err = Backend::connect(&path, 2).err().expect("connected");
    assert!(
        matches!(
            err,
            VhostUserError::Queues {
                offered: 1,
                needed: 2
            }
        ),
        "{err}"
    );
    backend.join().unwrap();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_reset_disables_then_stops_each_queue_the_backend_holds_over_a_handed_connection() {
    let (path, listener) = socket("stop");
    let backend =
        std::thread::spawn(move || mock(listener, VERSION_1 | PROTOCOL_FEATURES_BIT, MQ, 2));
    // Connected elsewhere (the supervisor does it), handed over as a stream.
    let stream = UnixStream::connect(&path).unwrap();
    let mut b = Backend::over(stream, 2).unwrap();
    let mem = create_guest_memory(16 << 20, Backing::Shared, false).unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    b.activate(VERSION_1, &mem, &queue(&kick, &call, 0x1000))
        .unwrap();
    b.stop(1).unwrap();
    drop(b);
    let seen = backend.join().unwrap();
    let _ = std::fs::remove_file(&path);
    // Enabled at the start, then disabled before GET_VRING_BASE takes it back.
    assert_eq!(seen.enabled, [(0, 1), (0, 0)]);
    assert_eq!(seen.requests[seen.requests.len() - 2..], [18, 11]);
}
