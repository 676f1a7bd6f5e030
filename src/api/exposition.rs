//! The daemon's Prometheus endpoint (`metrics_listen`, for admins and the operator's
//! Prometheus): every VM's metrics file, merged into one exposition. Each VM's series already
//! carry `vm_id` and `tenant`; what the merge adds is one `# HELP`/`# TYPE` block per family,
//! which the text format requires, with every VM's samples under it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::daemon::Daemon;
use super::server::{CONNECTION_LIFETIME, HEADER_TIMEOUT, MAX_CONNECTIONS};

/// One metric family: its comment lines (HELP, TYPE, UNIT) and its samples.
#[derive(Default)]
struct Family {
    comments: Vec<String>,
    samples: Vec<String>,
}

/// Merges Prometheus/OpenMetrics text expositions: families in the order first seen, each with
/// its comment lines once and the samples of all.
pub fn merge<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for text in texts {
        let mut current = String::new();
        for line in text.lines() {
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                // `# HELP name ...`, `# TYPE name kind`, `# UNIT name unit`.
                current = rest.split(' ').nth(1).unwrap_or("").to_string();
                let family = families.entry(current.clone()).or_insert_with(|| {
                    order.push(current.clone());
                    Family::default()
                });
                if !family.comments.iter().any(|c| c == line) {
                    family.comments.push(line.to_string());
                }
                continue;
            }
            let family = families.entry(current.clone()).or_insert_with(|| {
                order.push(current.clone());
                Family::default()
            });
            family.samples.push(line.to_string());
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some(f) = families.get(&name) {
            for line in f.comments.iter().chain(&f.samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

/// Every VM's metrics, merged.
fn exposition(daemon: &Daemon) -> String {
    let ids: Vec<String> = daemon.vms().keys().cloned().collect();
    let texts: Vec<String> = ids
        .iter()
        .filter_map(|id| std::fs::read_to_string(daemon.paths(id).metrics()).ok())
        .collect();
    merge(texts.iter().map(String::as_str))
}

/// Serves `GET /metrics` on `listener`.
pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
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
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let daemon = daemon.clone();
                async move {
                    let mut response = if req.uri().path() == "/metrics" {
                        let mut r = Response::new(Full::new(Bytes::from(exposition(&daemon))));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    } else {
                        Response::new(Full::new(Bytes::from_static(b"only /metrics here\n")))
                    };
                    if req.uri().path() != "/metrics" {
                        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_vms_metrics_merge_into_one_block_per_family() {
        let a =
            "# HELP bulkhead_up Up.\n# TYPE bulkhead_up gauge\nbulkhead_up{vm_id=\"a\"} 1\n# EOF\n";
        let b =
            "# HELP bulkhead_up Up.\n# TYPE bulkhead_up gauge\nbulkhead_up{vm_id=\"b\"} 1\n# EOF\n";
        let merged = merge([a, b]);
        assert_eq!(
            merged,
            "# HELP bulkhead_up Up.\n# TYPE bulkhead_up gauge\nbulkhead_up{vm_id=\"a\"} 1\nbulkhead_up{vm_id=\"b\"} 1\n# EOF\n"
        );
        assert_eq!(merged.matches("# TYPE").count(), 1);
    }
}
