//! The daemon's sockets: one per tenant (`RUN_DIR/tenants/TENANT.sock`, the tenant's, 0600),
//! `RUN_DIR/admin.sock` (root's, 0600), and optionally the Prometheus listener. HTTP/1.1 on a
//! current-thread tokio runtime; the VM processes never start one.
//!
//! A client can not hold the daemon up: each socket takes at most [`MAX_CONNECTIONS`] at once
//! (the rest are closed at once, and a tenant's crowd never touches another tenant's socket),
//! headers must arrive within [`HEADER_TIMEOUT`], a body within [`BODY_TIMEOUT`] and at most
//! [`MAX_BODY`] bytes, and a connection lives at most [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use super::audit_log::{DaemonAction, Record};
use super::error::ServeError;
use super::exposition::Listener;
use super::http::{
    Reply, BODY_TIMEOUT, CONNECTION_LIFETIME, HEADER_TIMEOUT, MAX_BODY, MAX_CONNECTIONS,
    REASON_HEADER,
};
use super::registry::{Daemon, DaemonError, Principal};
use super::routes;
use crate::config::serve::{MetricsListen, ServeConfig};
use crate::exit::status;

/// How often the daemon logs the audit log's head.
pub const AUDIT_HEAD_EVERY: Duration = Duration::from_secs(60);

/// Which socket a connection came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Door {
    Tenant(String),
    Admin,
}

/// A caller, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: u32,
    pid: i32,
}

/// Runs the daemon until SIGTERM or SIGINT; returns the exit status. VMs keep running when it
/// stops, and a daemon started again takes them back.
pub fn serve(config: ServeConfig) -> i32 {
    // SAFETY: umask only changes this process's file-creation mask: sockets are made with no
    // access for others before they are given to their owner.
    unsafe { libc::umask(0o077) };
    let daemon = match Daemon::open(config) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            log::error!("{}", crate::error_chain(&e));
            return match e {
                DaemonError::Audit(_) => status::BAD_INPUT,
                _ => status::RUNTIME_ERROR,
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log::error!("cannot start the daemon's runtime: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    runtime.block_on(run(daemon))
}

async fn run(daemon: Arc<Daemon>) -> i32 {
    let run_dir = daemon.config.run_dir.clone();
    let mut doors = Vec::new();
    for (name, t) in &daemon.config.tenants {
        let path = run_dir.join("tenants").join(format!("{name}.sock"));
        let owner = t.uids.iter().next().copied().unwrap_or(0);
        doors.push((path, Door::Tenant(name.clone()), owner));
    }
    doors.push((run_dir.join("admin.sock"), Door::Admin, 0));
    for (path, door, owner) in doors {
        match bind_for(&path, owner) {
            Ok(listener) => {
                log::info!("listening on {}", path.display());
                tokio::spawn(accept_loop(daemon.clone(), listener, door));
            }
            Err(e) => {
                log::error!("cannot listen on {}: {e}", path.display());
                return status::RUNTIME_ERROR;
            }
        }
    }
    if let Some(listen) = &daemon.config.metrics_listen {
        match metrics_listener(listen).await {
            Ok(l) => tokio::spawn(super::exposition::serve(daemon.clone(), l)),
            Err(e) => {
                log::error!("metrics_listen: {e}");
                return status::RUNTIME_ERROR;
            }
        };
    }
    tokio::spawn(daemon.clone().watch_adopted());
    tokio::spawn(log_audit_head(daemon.clone()));
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
        match (term.as_mut(), int.as_mut()) {
            (Ok(t), Ok(i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    stop.await;
    log::info!("stopping; VMs keep running and a daemon started again takes them back");
    status::OK
}

/// The merged metrics endpoint's listener: a Unix socket root's (0600) or root's and
/// `group`'s (0660), or TCP with the token read from its file (a regular file no one but its
/// owner may read or write).
async fn metrics_listener(listen: &MetricsListen) -> std::io::Result<Listener> {
    match listen {
        MetricsListen::Unix { path, group } => {
            let mode = if group.is_some() { 0o660 } else { 0o600 };
            let l = bind(path, 0, *group, mode, false)?;
            log::info!("Prometheus metrics on unix:{}, /metrics", path.display());
            Ok(Listener::Unix(l))
        }
        MetricsListen::Tcp { addr, token_file } => {
            let token = read_token(token_file)?;
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let bound = listener.local_addr()?;
            log::info!("Prometheus metrics on http://{bound}/metrics, with a bearer token");
            Ok(Listener::Tcp {
                listener,
                token: Arc::new(token),
            })
        }
    }
}

fn read_token(path: &Path) -> std::io::Result<String> {
    let text = crate::hostfile::read_settings(path).map_err(std::io::Error::other)?;
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} may be read by others than its owner (mode {:o})",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let token = text.trim().to_string();
    if token.len() < 16 {
        return Err(std::io::Error::other(format!(
            "{} holds fewer than 16 characters",
            path.display()
        )));
    }
    Ok(token)
}

/// Binds the socket at `path` (a stale socket there is replaced; anything else is refused)
/// and gives it to `owner`, mode 0600.
fn bind_for(path: &Path, owner: u32) -> std::io::Result<UnixListener> {
    bind(path, owner, None, 0o600, true)
}

/// Binds the socket at `path` (a stale socket there is replaced; anything else is refused),
/// owned by `owner` (and `group`), with `mode`.
fn bind(
    path: &Path,
    owner: u32,
    group: Option<u32>,
    mode: u32,
    own_dir: bool,
) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        // The daemon's own directories are made passable; another's (the operator's choice for
        // the metrics socket: /tmp, a Prometheus directory) is left as it is, made only when
        // missing.
        if own_dir || !parent.exists() {
            std::fs::create_dir_all(parent)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is there",
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::os::unix::fs::chown(path, Some(owner), group)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

async fn accept_loop(daemon: Arc<Daemon>, listener: UnixListener, door: Door) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let budget = budget_of(&daemon, &door);
    if let (Some(b), Door::Tenant(name)) = (&budget, &door) {
        tokio::spawn(audit_refusals(daemon.clone(), name.clone(), b.clone()));
    }
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: this client waits for nobody's slot; it is closed at once.
            drop(stream);
            continue;
        };
        let caller = match stream.peer_cred() {
            Ok(c) => Caller {
                uid: c.uid(),
                pid: c.pid().unwrap_or(0),
            },
            Err(_) => continue,
        };
        let daemon = daemon.clone();
        let door = door.clone();
        let budget = budget.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let daemon = daemon.clone();
                let door = door.clone();
                let budget = budget.clone();
                async move { Ok::<_, Infallible>(handle(daemon, door, caller, budget, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_BODY)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

/// Who the caller is on this door, or why they may not use it.
fn principal(daemon: &Daemon, door: &Door, caller: Caller) -> Result<Principal, ServeError> {
    match door {
        Door::Tenant(name) => {
            let member = daemon
                .config
                .tenants
                .get(name)
                .is_some_and(|t| t.uids.contains(&caller.uid));
            if member {
                Ok(Principal::Tenant {
                    name: name.clone(),
                    uid: caller.uid,
                })
            } else {
                Err(ServeError::NotMember {
                    uid: caller.uid,
                    tenant: name.clone(),
                })
            }
        }
        Door::Admin if daemon.config.admins.contains(&caller.uid) => {
            Ok(Principal::Admin { uid: caller.uid })
        }
        Door::Admin => Err(ServeError::NotAdmin { uid: caller.uid }),
    }
}

/// A tenant socket's request budget: a token bucket of `request_burst` requests, refilled at
/// `requests_per_second`. Requests past it are answered 429 and, so that a flood can not fill
/// the audit log, counted and audited once a second as one line.
struct Budget {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
    refused: u64,
}

impl Budget {
    fn new(rate: u32, burst: u32) -> Budget {
        Budget {
            tokens: f64::from(burst),
            last: Instant::now(),
            rate: f64::from(rate),
            burst: f64::from(burst),
            refused: 0,
        }
    }

    /// Takes one request's token; false (and counted) when there is none.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}

type SharedBudget = Arc<std::sync::Mutex<Budget>>;

fn budget_of(daemon: &Daemon, door: &Door) -> Option<SharedBudget> {
    match door {
        Door::Tenant(name) => daemon.config.tenants.get(name).map(|t| {
            Arc::new(std::sync::Mutex::new(Budget::new(
                t.requests_per_second,
                t.request_burst,
            )))
        }),
        Door::Admin => None,
    }
}

/// Once a second, one audit line for the requests `budget` refused since the last.
async fn audit_refusals(daemon: Arc<Daemon>, tenant: String, budget: SharedBudget) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let (refused, rate, burst) = {
            let mut b = budget.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut b.refused), b.rate, b.burst)
        };
        if refused == 0 {
            continue;
        }
        let d = daemon.clone();
        let tenant = tenant.clone();
        let _ = tokio::task::spawn_blocking(move || {
            d.audit(Record::of_daemon(
                DaemonAction::RateLimited,
                Some(tenant.clone()),
                String::new(),
                None,
                429,
                format!(
                    "{refused} request(s) past tenant {tenant}'s limit of {rate} a second (burst {burst}) were refused"
                ),
            ))
        })
        .await;
    }
}

/// Logs the audit log's head every minute, so that a cut tail is found by comparing.
async fn log_audit_head(daemon: Arc<Daemon>) {
    let mut tick = tokio::time::interval(AUDIT_HEAD_EVERY);
    loop {
        tick.tick().await;
        let d = daemon.clone();
        if let Ok((seq, head)) = tokio::task::spawn_blocking(move || d.audit_head()).await {
            log::info!("audit log head: {seq} lines, head {head}");
        }
    }
}

fn respond(reply: Reply, close: bool) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(reply.content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    if close {
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    response
}

async fn handle(
    daemon: Arc<Daemon>,
    door: Door,
    caller: Caller,
    budget: Option<SharedBudget>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if let Some(b) = &budget {
        if !b.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return respond(Reply::from(ServeError::RateLimited), true);
        }
    }
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let reason = req
        .headers()
        .get(REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let tenant = match &door {
        Door::Tenant(t) => Some(t.clone()),
        Door::Admin => None,
    };
    let who = principal(&daemon, &door, caller);
    let body = Limited::new(req.into_body(), MAX_BODY);
    let request = match who {
        Err(why) => Err(why),
        Ok(who) => match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
            Err(_) => Err(ServeError::BodyTimeout),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ServeError::BodyTooLarge(MAX_BODY))
            }
            Ok(Err(e)) => Err(ServeError::Body(e)),
            Ok(Ok(collected)) => Ok((
                who,
                routes::Request {
                    method: method.clone(),
                    path: path.clone(),
                    query,
                    reason,
                    body: collected.to_bytes().to_vec(),
                },
            )),
        },
    };
    // Everything that may block (files, path checks, the audit log's sync) runs off the
    // runtime's one thread, so one tenant's slow path holds up nobody else.
    let d = daemon.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let reply = match request.and_then(|r| {
            // Nothing is acted on that the audit log could not record.
            d.audit_ready().map_err(ServeError::AuditUnwritable)?;
            Ok(r)
        }) {
            Err(refused) => Reply::from(refused),
            Ok((who, request)) => routes::route(&d, &who, request),
        };
        let _ = d.audit(Record {
            uid: caller.uid,
            pid: caller.pid,
            tenant: match (&tenant, &reply.vm) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(vm)) => d.vms().get(vm).map(|r| r.tenant.clone()),
                (None, None) => None,
            },
            method,
            path,
            vm: reply.vm.clone(),
            outcome: reply.status,
            reason: reply.audit_reason.clone(),
        });
        reply
    });
    let reply = worker
        .await
        .unwrap_or_else(|_| Reply::from(ServeError::Worker));
    respond(reply, false)
}
