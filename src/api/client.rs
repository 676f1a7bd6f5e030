//! `bulkhead ctl`: a small blocking HTTP/1.1 client for the daemon's Unix sockets. No runtime:
//! one request, one connection, `Connection: close`.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} answered something that is not HTTP")]
    Garbled { path: PathBuf },
    #[error("no socket of yours in {dir}: pass --socket")]
    NoSocket { dir: PathBuf },
}

/// An answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The caller's socket: as root, the admin socket; otherwise the tenant socket in
/// `RUN_DIR/tenants` that the caller owns.
pub fn default_socket(run_dir: &Path) -> Result<PathBuf, ClientError> {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return Ok(run_dir.join("admin.sock"));
    }
    let dir = run_dir.join("tenants");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "sock")
                && std::fs::metadata(p).is_ok_and(|m| m.uid() == uid)
        })
        .ok_or(ClientError::NoSocket { dir })
}

/// Sends one request to the daemon at `socket`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    reason: Option<&str>,
) -> Result<Answer, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: bulkhead\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(r) = reason {
        // A header value ends at a line break: one in the reason would start another header.
        let r: String = r.chars().filter(|c| !c.is_control()).collect();
        head.push_str(&format!("X-Bulkhead-Reason: {r}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    // Read until the answer is whole: servers that keep the connection open (Firecracker's
    // does, whatever `Connection: close` says) never send an end of file.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if complete(&raw) {
            break;
        }
        // A socket with a read timeout is never restarted after a signal handler ran, even
        // with SA_RESTART: a handled signal to this thread is not the server's answer.
        let n = match stream.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other.map_err(io)?,
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    parse(&raw).ok_or(ClientError::Garbled {
        path: socket.to_path_buf(),
    })
}

/// Whether `raw` holds a whole answer: headers, and then the body its Content-Length gives
/// (none without one, as for a 204), or a chunked body up to its last chunk.
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(raw.get(..split).unwrap_or_default()).to_ascii_lowercase();
    let body = raw.get(split + 4..).unwrap_or_default();
    if head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        return body.ends_with(b"0\r\n\r\n");
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    body.len() >= length
}

/// Splits a whole HTTP/1.1 response (the connection closed after it) into status and body,
/// undoing chunked transfer encoding.
fn parse(raw: &[u8]) -> Option<Answer> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(raw.get(..split)?).ok()?;
    let mut body = raw.get(split + 4..)?.to_vec();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(rest.get(..line_end)?).ok()?.trim(), 16)
                    .ok()?;
            rest = rest.get(line_end + 2..)?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_answers_parse() {
        let a = parse(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (201, &b"{}"[..]));
        let c = parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!(c.body, b"abcde");
        assert!(parse(b"nonsense").is_none());
    }
}
