//! `--alerts-http`: each alert POSTed as JSON to a falcosidekick-compatible endpoint, from a
//! thread of its own so a slow or dead endpoint never holds up the supervisor.
//!
//! The request is one plain HTTP/1.1 POST with a length and `Connection: close`, and only the
//! status line of the answer is read: small enough to write here, where a client crate would
//! bring a URL and TLS stack and resolve names at send time, which the supervisor's seccomp
//! filter does not allow. The name is resolved once, before the supervisor confines itself.
//! A failed delivery is retried a bounded number of times, then dropped and counted; a full
//! queue drops and counts too.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::config::HttpTarget;

/// Alerts waiting for delivery; more are dropped.
const QUEUE: usize = 256;
/// Tries per alert.
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_secs(2);

/// Errors setting up delivery.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot resolve the --alerts-http host {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the --alerts-http host {0} has no address")]
    NoAddress(String),
    #[error("cannot start the alert delivery thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Delivery counters, shared with the metrics. One lock keeps them consistent: every alert
/// handed to [`HttpSink::send`] is counted exactly once, as sent or dropped.
#[derive(Debug, Default)]
pub struct Deliveries(Mutex<Counts>);

#[derive(Debug, Default)]
struct Counts {
    sent: u64,
    /// Queue full, or every try failed.
    failed: u64,
    /// Queued and not yet tried to the end.
    pending: u64,
    /// Set when the supervisor stopped waiting: what was pending then is dropped, and a
    /// delivery that ends later changes nothing.
    closed: bool,
}

impl Deliveries {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        // The counts stay meaningful even if a holder panicked.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn sent(&self) -> u64 {
        self.counts().sent
    }

    /// Alerts that never reached the endpoint: refused, failed, or left behind at exit.
    pub fn dropped(&self) -> u64 {
        let c = self.counts();
        if c.closed {
            c.failed.saturating_add(c.pending)
        } else {
            c.failed
        }
    }

    fn queued(&self) {
        let mut c = self.counts();
        c.pending = c.pending.saturating_add(1);
    }

    /// A queued alert's delivery ended (`sent` or not).
    fn ended(&self, sent: bool) {
        let mut c = self.counts();
        if c.closed {
            return;
        }
        c.pending = c.pending.saturating_sub(1);
        if sent {
            c.sent = c.sent.saturating_add(1);
        } else {
            c.failed = c.failed.saturating_add(1);
        }
    }

    fn close(&self) {
        self.counts().closed = true;
    }
}

/// The sending side, held by the supervisor's loop.
pub struct HttpSink {
    queue: Option<SyncSender<String>>,
    done: Receiver<()>,
    pub stats: Arc<Deliveries>,
}

/// Where alerts are POSTed, resolved.
pub struct Endpoint {
    addr: SocketAddr,
    host_header: String,
    path: String,
}

impl Endpoint {
    /// Resolves `target`'s name now, before the supervisor confines itself.
    pub fn resolve(target: &HttpTarget) -> Result<Endpoint, HttpError> {
        let addr = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|source| HttpError::Resolve {
                host: target.host.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| HttpError::NoAddress(target.host.clone()))?;
        let host_header = if target.host.contains(':') {
            format!("[{}]:{}", target.host, target.port)
        } else {
            format!("{}:{}", target.host, target.port)
        };
        Ok(Endpoint {
            addr,
            host_header,
            path: target.path.clone(),
        })
    }
}

impl HttpSink {
    /// Starts the delivery thread.
    pub fn start(endpoint: Endpoint) -> Result<HttpSink, HttpError> {
        let (queue, rx) = mpsc::sync_channel::<String>(QUEUE);
        let (done_tx, done) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let stats = Arc::new(Deliveries::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("alerts-http".into())
            .spawn(move || {
                crate::signal::set_thread_name("alerts-http");
                let _ = ready_tx.send(());
                for body in rx {
                    thread_stats.ended(deliver(&endpoint, &body));
                }
                let _ = done_tx.send(());
            })
            .map_err(HttpError::Thread)?;
        // The thread's own start-up makes system calls the supervisor's filter does not
        // allow (it is installed on every thread at once): wait until that is behind it.
        let _ = ready.recv();
        Ok(HttpSink {
            queue: Some(queue),
            done,
            stats,
        })
    }

    /// Queues `body` for delivery; never blocks. A full queue drops it and counts the drop.
    pub fn send(&self, body: String) {
        let Some(queue) = &self.queue else { return };
        self.stats.queued();
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = queue.try_send(body) {
            self.stats.ended(false);
        }
    }

    /// Stops taking alerts and waits up to `wait` for the queue to drain.
    pub fn finish(&mut self, wait: Duration) {
        self.queue = None;
        if self.done.recv_timeout(wait).is_err() {
            self.stats.close();
        }
    }
}

/// POSTs `body`, retrying with a doubling back-off. True once a 2xx answer came back.
fn deliver(endpoint: &Endpoint, body: &str) -> bool {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 0..ATTEMPTS {
        match post(endpoint, body) {
            Ok(status) if (200..300).contains(&status) => return true,
            Ok(status) => crate::warn_limited!("alert endpoint answered {status}"),
            Err(e) => crate::warn_limited!("alert endpoint: {e}"),
        }
        if attempt + 1 < ATTEMPTS {
            std::thread::sleep(backoff);
            backoff *= 2;
        }
    }
    false
}

/// One POST; the answer's status code.
fn post(endpoint: &Endpoint, body: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&endpoint.addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bulkhead/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        endpoint.path,
        endpoint.host_header,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut answer = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let Some(rest) = answer.get_mut(got..) else {
            break;
        };
        let n = stream.read(rest)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    status_code(answer.get(..got).unwrap_or_default())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

/// The status code of an HTTP/1.x status line.
fn status_code(line: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(line.get(..12)?).ok()?;
    let code = text.strip_prefix("HTTP/1.")?.get(2..5)?;
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn status_lines_parse_and_garbage_does_not() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 400 Bad"), Some(400));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(b"HTTP/1.1"), None);
    }

    #[test]
    fn an_alert_is_posted_as_json_with_its_length() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = server.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !String::from_utf8_lossy(&buf).contains("}") {
                let n = conn.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            String::from_utf8(buf).unwrap()
        });
        let target = HttpTarget {
            host: "127.0.0.1".into(),
            port,
            path: "/".into(),
        };
        let mut sink = HttpSink::start(Endpoint::resolve(&target).unwrap()).unwrap();
        sink.send(r#"{"rule":"x"}"#.into());
        sink.finish(Duration::from_secs(10));
        let request = handle.join().unwrap();
        assert!(request.starts_with("POST / HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains("Content-Type: application/json"),
            "{request}"
        );
        assert!(request.contains("Content-Length: 12\r\n"), "{request}");
        assert!(request.ends_with(r#"{"rule":"x"}"#), "{request}");
        assert_eq!(sink.stats.sent(), 1);
    }

    #[test]
    fn an_endpoint_that_is_down_costs_a_bounded_number_of_tries_then_a_counted_drop() {
        // Bind then drop: nothing listens on this port.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = HttpTarget {
            host: "127.0.0.1".into(),
            port,
            path: "/".into(),
        };
        let mut sink = HttpSink::start(Endpoint::resolve(&target).unwrap()).unwrap();
        sink.send("{}".into());
        sink.finish(Duration::from_secs(10));
        assert_eq!(sink.stats.dropped(), 1);
        assert_eq!(sink.stats.sent(), 0);
    }

    #[test]
    fn an_alert_left_behind_at_exit_is_counted_once_even_if_it_arrives_later() {
        let stats = Deliveries::default();
        stats.queued();
        stats.queued();
        stats.ended(true);
        stats.close();
        assert_eq!((stats.sent(), stats.dropped()), (1, 1));
        // The delivery the supervisor stopped waiting for ends after all.
        stats.ended(true);
        assert_eq!((stats.sent(), stats.dropped()), (1, 1));
    }
}
