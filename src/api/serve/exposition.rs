//! The daemon's Prometheus endpoint (`metrics_listen`, for admins and the operator's
//! Prometheus): every VM's metrics file, merged into one exposition. It shows every tenant's
//! VMs, so it listens on a Unix socket only root (and a configured group) may use, or on TCP
//! for requests that carry the operator's bearer token. Each VM's series already
//! carry `vm_id` and `tenant`; the merge (`telemetry::Exposition::merge`) reads each file back
//! and writes one `# HELP`/`# TYPE` block per family, which the text format requires, with every
//! VM's samples under it.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};

use super::http::{CONNECTION_LIFETIME, HEADER_TIMEOUT, MAX_CONNECTIONS};
use super::registry::Daemon;
use crate::telemetry::Exposition;

/// Every VM's metrics, merged.
fn exposition(daemon: &Daemon) -> String {
    let ids: Vec<String> = daemon.vms().keys().cloned().collect();
    let read: Vec<Exposition> = ids
        .iter()
        .filter_map(|id| std::fs::read_to_string(daemon.paths(id).metrics()).ok())
        .map(|text| Exposition::parse(&text))
        .collect();
    Exposition::merge(&read)
}

/// The merged endpoint's listener: a Unix socket (its mode decides who may connect), or TCP,
/// where every request must carry the bearer token.
pub enum Listener {
    Unix(UnixListener),
    Tcp {
        listener: TcpListener,
        token: Arc<String>,
    },
}

/// Serves `GET /metrics` on `listener`.
pub async fn serve(daemon: Arc<Daemon>, listener: Listener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = match &listener {
            Listener::Unix(l) => l.accept().await.map(|(s, _)| (Stream::Unix(s), None)),
            Listener::Tcp { listener, token } => listener
                .accept()
                .await
                .map(|(s, _)| (Stream::Tcp(s), Some(token.clone()))),
        };
        let Ok((stream, token)) = accepted else {
            // Out of descriptors, say: wait rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match stream {
                Stream::Unix(s) => connection(daemon, token, s).await,
                Stream::Tcp(s) => connection(daemon, token, s).await,
            }
        });
    }
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// Serves one connection; with a `token`, only requests that carry it.
async fn connection<S>(daemon: Arc<Daemon>, token: Option<Arc<String>>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
        let daemon = daemon.clone();
        let token = token.clone();
        async move {
            let allowed = token.as_deref().map_or(true, |t| bearer_matches(&req, t));
            let (status, body) = if !allowed {
                (
                    hyper::StatusCode::UNAUTHORIZED,
                    b"a bearer token is needed\n".to_vec(),
                )
            } else if req.uri().path() == "/metrics" {
                (hyper::StatusCode::OK, exposition(&daemon).into_bytes())
            } else {
                (
                    hyper::StatusCode::NOT_FOUND,
                    b"only /metrics here\n".to_vec(),
                )
            };
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            if status == hyper::StatusCode::OK {
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
            }
            if status == hyper::StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Bearer"),
                );
            }
            Ok::<_, Infallible>(r)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
}

/// True when `req` carries `Authorization: Bearer TOKEN` with this token. Compared in time
/// that does not depend on where the first difference is.
fn bearer_matches<B>(req: &hyper::Request<B>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_let_in() {
        let with = |v: Option<&str>| {
            let mut b = hyper::Request::builder();
            if let Some(v) = v {
                b = b.header(hyper::header::AUTHORIZATION, v);
            }
            b.body(()).unwrap()
        };
        assert!(bearer_matches(&with(Some("Bearer s3cret")), "s3cret"));
        for wrong in [
            None,
            Some("Bearer s3crex"),
            Some("Bearer s3cre"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            assert!(!bearer_matches(&with(wrong), "s3cret"), "{wrong:?}");
        }
    }
}
