//! The `bulkhead` command: parses arguments, sets up logging, and hands over to the
//! supervisor, which forks the VM process. It never touches KVM itself.

mod cli;

use std::process::ExitCode;

use bulkhead::config::{host_mem_mib, VmConfig};
use bulkhead::exit::status;
use bulkhead::RawConfig;
use clap::Parser;

use cli::{AuditLogCommand, Cli, Command, CtlArgs, CtlCommand, ExecArgs, LogLevel, RunArgs};

fn main() -> ExitCode {
    let invoked_as = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    if invoked_as == "jailer" {
        return match cli::JailerCli::try_parse() {
            Ok(j) => {
                bulkhead::logger::init("jailer", log::LevelFilter::Info);
                let e = bulkhead::jail::jailer::run(&j.args.options());
                log::error!("jailer: {}", bulkhead::error_chain(&e));
                exit_code(status::BAD_INPUT)
            }
            Err(e) => parse_error(&e, status::BAD_INPUT),
        };
    }
    if invoked_as == "firecracker" {
        return match cli::FirecrackerCli::try_parse() {
            Ok(fc) => {
                bulkhead::logger::init("firecracker", log::LevelFilter::Info);
                exit_code(firecracker(&fc.args))
            }
            // Firecracker's status for an argument error.
            Err(e) => parse_error(&e, 153),
        };
    }
    // Every VM's supervisor starts here; `cli::RunCli` says why `run` is parsed alone.
    if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
        return match cli::RunCli::try_parse_from(std::env::args_os().skip(1)) {
            Ok(r) => {
                bulkhead::logger::init("bulkhead", r.log_level.into());
                exit_code(run(&r.args))
            }
            Err(e) => parse_error(&e, status::BAD_INPUT),
        };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_error(&e, status::BAD_INPUT),
    };
    bulkhead::logger::init("bulkhead", cli.log_level.into());
    let code = match cli.command {
        Command::Run(args) => run(&args),
        Command::Exec(args) => exec(&args, cli.log_level),
        Command::AuditLog(AuditLogCommand::Verify { file, head }) => {
            verify_audit_log(&file, head.as_deref())
        }
        Command::Serve { config } => serve(&config),
        Command::Ctl(args) => ctl(&args),
        Command::Snapshot(command) => snapshot(&command),
        Command::Audit { out, guests } => audit(&out, guests),
        Command::Firecracker(args) => firecracker(&args),
        Command::Jailer(args) => {
            let e = bulkhead::jail::jailer::run(&args.options());
            log::error!("jailer: {}", bulkhead::error_chain(&e));
            status::BAD_INPUT
        }
    };
    exit_code(code)
}

/// Prints clap's message; `--help` and `--version` end with 0, a bad command line with `bad`.
fn parse_error(e: &clap::Error, bad: i32) -> ExitCode {
    let _ = e.print();
    exit_code(if e.use_stderr() { bad } else { status::OK })
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run(args: &RunArgs) -> i32 {
    let config = match load_config(args) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return status::BAD_INPUT;
        }
    };
    bulkhead::supervisor::run(&config)
}

/// `bulkhead exec`: the VM's own log lines are shown from warnings up unless more was asked.
fn exec(args: &ExecArgs, level: LogLevel) -> i32 {
    // Without --modules, the host's own tree when the kernel is the same version.
    let tree = args
        .modules
        .clone()
        .or_else(|| bulkhead::exec::modules::host_tree_for(&args.kernel));
    let modules = match &tree {
        Some(dir) => match bulkhead::exec::modules::Modules::resolve(
            dir,
            &bulkhead::exec::modules::NEEDED_MODULES,
        ) {
            Ok(m) => m,
            Err(e) => {
                eprintln!(
                    "bulkhead exec: the kernel modules in {}: {e}",
                    dir.display()
                );
                return status::BAD_INPUT;
            }
        },
        None => Default::default(),
    };
    let vcpus = args.vcpus.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32)
    });
    let options = bulkhead::exec::ExecOptions {
        kernel: args.kernel.clone(),
        shares: args.shares.clone(),
        mem_mib: args.mem_mib,
        vcpus,
        timeout: args.timeout,
        modules,
        cmdline: args.cmdline.clone(),
        virtiofsd: args.virtiofsd.clone(),
        no_seccomp: args.no_seccomp,
        command: args.command.clone(),
    };
    let level = match level {
        LogLevel::Error => "error",
        LogLevel::Warn | LogLevel::Info => "warn",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    bulkhead::exec::run(&options, Some(level))
}

/// The Firecracker personality. `--version` prints Firecracker's version (the one Kata pins)
/// on the first line, as Kata reads it, and bulkhead's on the next.
fn firecracker(args: &cli::FcArgs) -> i32 {
    if args.version {
        println!(
            "Firecracker v{}\nbulkhead {} (the Firecracker personality)",
            bulkhead::api::firecracker::routes::FIRECRACKER_VERSION,
            env!("CARGO_PKG_VERSION")
        );
        return status::OK;
    }
    bulkhead::api::firecracker::run(args.options())
}

fn serve(path: &std::path::Path) -> i32 {
    let text = match bulkhead::hostfile::read_settings(path) {
        Ok(t) => t,
        Err(e) => {
            log::error!("{e}");
            return status::BAD_INPUT;
        }
    };
    match bulkhead::config::serve::ServeConfig::from_json(&text) {
        Ok(config) => bulkhead::api::serve::serve(config),
        Err(e) => {
            log::error!("{}: {e}", path.display());
            status::BAD_INPUT
        }
    }
}

/// `bulkhead snapshot`: 0 when done, 1 when the VM refused or failed, 2 when it can not be
/// reached or a file can not be made.
fn snapshot(command: &cli::SnapshotCommand) -> i32 {
    use bulkhead::snapshot::client::{self, ClientError};
    let result = match command {
        cli::SnapshotCommand::Create {
            control_socket,
            state,
            mem,
            keep_paused,
            diff,
        } => {
            let kind = if *diff {
                bulkhead::snapshot::SnapshotKind::Diff
            } else {
                bulkhead::snapshot::SnapshotKind::Full
            };
            client::create(control_socket, state, mem, kind, *keep_paused)
        }
        cli::SnapshotCommand::Rebase { base, diff, out } => {
            return match bulkhead::snapshot::rebase::rebase(base, diff, out) {
                Ok(done) => {
                    log::info!(
                        "{}: {} MiB of guest RAM, {} KiB from the base, {} KiB from the diff",
                        out.display(),
                        done.bytes >> 20,
                        done.from_base >> 10,
                        done.from_diff >> 10
                    );
                    status::OK
                }
                Err(e) => {
                    log::error!("{}", bulkhead::error_chain(&e));
                    // Bad inputs are status 2; failing to write the result is a run-time error.
                    match e {
                        bulkhead::snapshot::rebase::RebaseError::Write { .. } => {
                            status::RUNTIME_ERROR
                        }
                        _ => status::BAD_INPUT,
                    }
                }
            };
        }
        cli::SnapshotCommand::Pause { control_socket } => client::pause(control_socket, true),
        cli::SnapshotCommand::Resume { control_socket } => client::pause(control_socket, false),
        cli::SnapshotCommand::Load(args) => {
            if args.restore.is_none() {
                log::error!("bulkhead snapshot load needs --state STATE --mem MEM");
                return status::BAD_INPUT;
            }
            return run(args);
        }
    };
    match result {
        Ok(()) => status::OK,
        Err(e @ ClientError::Refused { .. }) => {
            log::error!("{e}");
            status::RUNTIME_ERROR
        }
        Err(e) => {
            log::error!("{}", bulkhead::error_chain(&e));
            status::BAD_INPUT
        }
    }
}

/// `bulkhead ctl`: prints the answer's body; exits 0 on 2xx, 1 on an error answer (its message
/// on stderr), 2 when the daemon can not be reached or the input is bad.
fn ctl(args: &CtlArgs) -> i32 {
    use bulkhead::api::client;
    let socket = match args
        .socket
        .clone()
        .map_or_else(|| client::default_socket(&args.run_dir), Ok)
    {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return status::BAD_INPUT;
        }
    };
    let mut body = Vec::new();
    let (method, path, payload) = match &args.command {
        CtlCommand::Create { config } => {
            body = match std::fs::read(config) {
                Ok(b) => b,
                Err(e) => {
                    log::error!("cannot read {}: {e}", config.display());
                    return status::BAD_INPUT;
                }
            };
            ("POST", "/v1/vms".to_string(), Some(body.as_slice()))
        }
        CtlCommand::List => ("GET", "/v1/vms".to_string(), None),
        CtlCommand::Get { id } => ("GET", format!("/v1/vms/{id}"), None),
        CtlCommand::Stop { id } => ("POST", format!("/v1/vms/{id}/stop"), None),
        CtlCommand::Pause { id } => ("POST", format!("/v1/vms/{id}/pause"), None),
        CtlCommand::Resume { id } => ("POST", format!("/v1/vms/{id}/resume"), None),
        CtlCommand::Delete { id } => ("DELETE", format!("/v1/vms/{id}"), None),
        CtlCommand::Metrics { id } => ("GET", format!("/v1/vms/{id}/metrics"), None),
        CtlCommand::Alerts { id } => ("GET", format!("/v1/vms/{id}/alerts"), None),
        CtlCommand::Report { id, markdown } => {
            let q = if *markdown { "?format=md" } else { "" };
            ("GET", format!("/v1/vms/{id}/report{q}"), None)
        }
        CtlCommand::AuditLog => ("GET", "/v1/audit-log".to_string(), None),
        CtlCommand::Request {
            method,
            path,
            body_file,
        } => {
            if let Some(f) = body_file {
                body = match std::fs::read(f) {
                    Ok(b) => b,
                    Err(e) => {
                        log::error!("cannot read {}: {e}", f.display());
                        return status::BAD_INPUT;
                    }
                };
            }
            let payload = body_file.as_ref().map(|_| body.as_slice());
            (method.as_str(), path.clone(), payload)
        }
    };
    match client::request(&socket, method, &path, payload, args.reason.as_deref()) {
        Ok(answer) if (200..300).contains(&answer.status) => {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = out.write_all(&answer.body);
            if !answer.body.ends_with(b"\n") && !answer.body.is_empty() {
                let _ = out.write_all(b"\n");
            }
            status::OK
        }
        Ok(answer) => {
            eprintln!(
                "{} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
            status::RUNTIME_ERROR
        }
        Err(e) => {
            log::error!("{}", bulkhead::error_chain(&e));
            status::BAD_INPUT
        }
    }
}

fn audit(out: &std::path::Path, guests: Option<std::path::PathBuf>) -> i32 {
    let guests = guests.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent()?.parent().map(|t| t.join("guest-images")))
            .unwrap_or_default()
    });
    match bulkhead::api::audit::run(out, &guests) {
        Ok(passed) => {
            println!(
                "{}: {}",
                out.join("audit.md").display(),
                if passed {
                    "every check passed"
                } else {
                    "CHECKS FAILED"
                }
            );
            if passed {
                status::OK
            } else {
                status::RUNTIME_ERROR
            }
        }
        Err(e) => {
            log::error!("{}", bulkhead::error_chain(&e));
            status::BAD_INPUT
        }
    }
}

fn verify_audit_log(file: &std::path::Path, head: Option<&str>) -> i32 {
    let checked = match head {
        None => bulkhead::api::serve::audit_log::verify_file(file).map(|c| c.map(|i| (i, None))),
        Some(h) => bulkhead::api::serve::audit_log::verify_file_with_head(file, h),
    };
    match checked {
        Ok(Ok((intact, at))) => {
            println!(
                "{}: {} entries, chain intact, head {}",
                file.display(),
                intact.entries,
                intact.head
            );
            match (head, at) {
                (None, _) => status::OK,
                (Some(h), Some(line)) => {
                    println!("{}: head {h} is line {line}", file.display());
                    status::OK
                }
                (Some(h), None) => {
                    println!(
                        "{}: no line has head {h}: the log was cut before it, or rewritten",
                        file.display()
                    );
                    status::RUNTIME_ERROR
                }
            }
        }
        Ok(Err(broken)) => {
            println!("{}: chain broken at {broken}", file.display());
            status::RUNTIME_ERROR
        }
        Err(e) => {
            log::error!("{}", bulkhead::error_chain(&e));
            status::BAD_INPUT
        }
    }
}

/// Why `bulkhead run`'s settings could not be taken.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Read(#[from] bulkhead::hostfile::HostFileError),
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: bulkhead::ConfigError,
    },
    #[error("{}: \"seccomp\": false needs --no-seccomp on the command line too", path.display())]
    SeccompOffInFile { path: std::path::PathBuf },
    #[error(transparent)]
    Invalid(#[from] bulkhead::ConfigError),
    #[error("--test-hook exists only in debug builds")]
    TestHookInRelease,
    #[error(transparent)]
    Restore(#[from] bulkhead::snapshot::RestoreSettingsError),
}

fn load_config(args: &RunArgs) -> Result<VmConfig, LoadError> {
    let file = match &args.config {
        Some(path) => {
            let text = bulkhead::hostfile::read_settings(path)?;
            let raw = RawConfig::from_json(&text).map_err(|source| LoadError::File {
                path: path.clone(),
                source,
            })?;
            // Turning the filters off is the operator's decision, on the command line: a
            // settings file (which may come from elsewhere) can not do it alone.
            if raw.seccomp == Some(false) && !args.no_seccomp {
                return Err(LoadError::SeccompOffInFile { path: path.clone() });
            }
            raw
        }
        None => RawConfig::default(),
    };
    let raw = file.overlay(args.raw_config());
    let raw = bulkhead::snapshot::restore_settings(raw)?;
    let mut config = VmConfig::from_raw(raw, host_mem_mib())?;
    if let Some(hook) = args.test_hook {
        if !cfg!(debug_assertions) {
            return Err(LoadError::TestHookInRelease);
        }
        config.test_hook = Some(hook);
    }
    Ok(config)
}
