//! The `bulkhead` command: parses arguments, sets up logging, and hands over to the
//! supervisor, which forks the VM process. It never touches KVM itself.

mod cli;

use std::process::ExitCode;

use bulkhead::config::{host_mem_mib, VmConfig};
use bulkhead::exit::status;
use bulkhead::RawConfig;
use clap::Parser;

use cli::{AuditLogCommand, Cli, Command, RunArgs};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let code = if e.use_stderr() {
                status::BAD_INPUT
            } else {
                status::OK
            };
            return exit_code(code);
        }
    };
    bulkhead::logger::init("bulkhead", cli.log_level.into());
    let code = match cli.command {
        Command::Run(args) => run(&args),
        Command::AuditLog(AuditLogCommand::Verify { file }) => verify_audit_log(&file),
    };
    exit_code(code)
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run(args: &RunArgs) -> i32 {
    let config = match load_config(args) {
        Ok(c) => c,
        Err(msg) => {
            log::error!("{msg}");
            return status::BAD_INPUT;
        }
    };
    if !config.seccomp {
        log::warn!("*** --no-seccomp: seccomp filters are OFF; this VMM is not confined. Debugging only. ***");
    }
    bulkhead::supervisor::run(&config)
}

fn verify_audit_log(file: &std::path::Path) -> i32 {
    match bulkhead::api::audit::verify_file(file) {
        Ok(Ok(intact)) => {
            println!(
                "{}: {} entries, chain intact, head {}",
                file.display(),
                intact.entries,
                intact.head
            );
            status::OK
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

fn load_config(args: &RunArgs) -> Result<VmConfig, String> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            RawConfig::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => RawConfig::default(),
    };
    let raw = file.overlay(args.raw_config());
    let mut config = VmConfig::from_raw(raw, host_mem_mib()).map_err(|e| e.to_string())?;
    if let Some(hook) = args.test_hook {
        if !cfg!(debug_assertions) {
            return Err("--test-hook exists only in debug builds".to_string());
        }
        config.test_hook = Some(hook);
    }
    Ok(config)
}
