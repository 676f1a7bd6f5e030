//! The personality's process loop: the API socket (hyper, on a current-thread runtime in this
//! front-end process only), the `--config-file` boot, a metrics line every minute, SIGTERM,
//! and the supervisor's end, which ends this process with its status.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;

use super::super::launch::Supervisor;
use super::state::Phase;
use super::{from_config_file, routes, Options, Personality, DEFAULT_API_SOCK, METRICS_PERIOD};
use crate::exit::status;

/// Firecracker's default body limit (`--http-api-max-payload-size`).
const MAX_PAYLOAD: usize = 51_200;

fn lock(p: &Mutex<Personality>) -> std::sync::MutexGuard<'_, Personality> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// When the front end looks for working directories left behind.
const SWEEP_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

pub fn serve(p: Arc<Mutex<Personality>>, opts: &Options) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log::error!("cannot start the API runtime: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    runtime.block_on(main_loop(p, opts.clone()))
}

async fn main_loop(p: Arc<Mutex<Personality>>, opts: Options) -> i32 {
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot watch SIGTERM: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    // The host blocked SIGTERM before forking this process (its death signal): one sent
    // meanwhile waits, and reaches the watch above now.
    crate::signal::unblock(&[libc::SIGTERM]);
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot watch SIGCHLD: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    let socket = (!opts.no_api).then(|| {
        opts.api_sock
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK))
    });
    if let Some(path) = &socket {
        match UnixListener::bind(path) {
            Ok(listener) => {
                log::info!("Listening on API socket ({path:?}).");
                tokio::spawn(accept_loop(p.clone(), listener));
            }
            Err(e) => {
                log::error!(
                    "Failed to open the API socket at: {}. Check that it is not already used. ({e})",
                    path.display()
                );
                return 1;
            }
        }
    }
    if let Some(file) = &opts.config_file {
        let started = {
            let mut g = lock(&p);
            from_config_file(&mut g, file).and_then(|()| g.start())
        };
        if let Err(e) = started {
            log::error!("Failed to build MicroVM from Json: {e}");
            remove(socket.as_deref());
            return 1;
        }
    }
    let mut tick = tokio::time::interval(METRICS_PERIOD);
    tick.tick().await;
    // A second in, off any request's path: the working directories personalities killed with
    // their whole process group left behind (see `workdir`).
    let sweep = tokio::time::sleep(SWEEP_AFTER);
    tokio::pin!(sweep);
    let mut swept = false;
    let code = loop {
        tokio::select! {
            () = &mut sweep, if !swept => {
                swept = true;
                let work = lock(&p).work.clone();
                let removed = super::workdir::sweep_stale(&work);
                if removed > 0 {
                    log::info!("removed {removed} working directories of personalities that are gone");
                }
            }
            _ = sigterm.recv() => {
                let (supervisor, vm) = {
                    let g = lock(&p);
                    (g.supervisor.as_ref().map(Supervisor::pid), g.vm_pid)
                };
                match supervisor {
                    // An orderly stop: the supervisor stops the VM and ends with 143.
                    Some(pid) => {
                        // A paused VM process must run to stop in order. It is this
                        // process's parent (see `host`): while it is, the pid is still it.
                        // SAFETY: getppid has no preconditions.
                        if let Some(vm) = vm.filter(|&vm| vm == unsafe { libc::getppid() }) {
                            let _ = crate::process::signal(vm, libc::SIGCONT);
                        }
                        let _ = crate::process::signal(pid, libc::SIGTERM);
                    }
                    None => break status::TERMINATED,
                }
            }
            _ = sigchld.recv() => {
                let ended = lock(&p).supervisor.as_ref().and_then(Supervisor::try_reap);
                if let Some(code) = ended {
                    let mut g = lock(&p);
                    g.phase = Phase::Ended;
                    let _ = g.flush_metrics();
                    break code;
                }
            }
            _ = tick.tick() => {
                let mut g = lock(&p);
                if g.phase != Phase::NotStarted {
                    if let Err(e) = g.flush_metrics() {
                        log::warn!("{e}");
                    }
                }
            }
        }
    };
    remove(socket.as_deref());
    code
}

fn remove(socket: Option<&Path>) {
    if let Some(s) = socket {
        let _ = std::fs::remove_file(s);
    }
}

async fn accept_loop(p: Arc<Mutex<Personality>>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let p = p.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let p = p.clone();
                async move { Ok::<_, Infallible>(handle(p, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(p: Arc<Mutex<Personality>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = match req.uri().query() {
        // Firecracker keeps a query string in the path it matches (and so refuses it).
        Some(q) => format!("{}?{q}", req.uri().path()),
        None => req.uri().path().to_string(),
    };
    let answer = match Limited::new(req.into_body(), MAX_PAYLOAD).collect().await {
        Ok(body) => {
            // On this thread, the process's main one, on purpose: InstanceStart forks the
            // supervisor, whose death signal follows the thread that forked it. Requests are
            // answered one at a time, as Firecracker's API thread does.
            routes::route(&mut lock(&p), &method, &path, &body.to_bytes())
        }
        Err(_) => routes::fault(format!(
            "Request payload with size larger than the limit of {MAX_PAYLOAD} bytes."
        )),
    };
    let body = answer
        .body
        .map(|b| Bytes::from(b.to_string()))
        .unwrap_or_default();
    let mut response = Response::new(Full::new(body));
    *response.status_mut() =
        hyper::StatusCode::from_u16(answer.status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    response.headers_mut().insert(
        hyper::header::SERVER,
        hyper::header::HeaderValue::from_static("Firecracker API"),
    );
    if answer.status != 204 {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    response
}
