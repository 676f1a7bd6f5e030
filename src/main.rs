//! The `bulkhead` command: parses arguments, sets up logging, runs one VM, and turns the
//! outcome into the process exit status. It never touches KVM itself.

mod cli;

use std::process::ExitCode;

use bulkhead::config::{host_mem_mib, VmConfig};
use bulkhead::exit::status;
use bulkhead::{build_vm, RawConfig};
use clap::Parser;

use cli::{Cli, Command, RunArgs};

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
    let vmm = match build_vm(&config) {
        Ok(vmm) => vmm,
        Err(e) => {
            log::error!("{}", error_chain(&e));
            return if e.is_bad_input() {
                status::BAD_INPUT
            } else {
                status::RUNTIME_ERROR
            };
        }
    };
    match vmm.run() {
        Ok(outcome) => {
            log::debug!("VM {} counters: {}", config.vm_id, outcome.counters);
            for device in &outcome.devices {
                log::debug!("VM {} device {device}", config.vm_id);
            }
            let message = format!(
                "VM {} (tenant {}): {}",
                config.vm_id, config.tenant, outcome.reason
            );
            if outcome.reason.is_orderly() {
                log::info!("{message}");
            } else {
                log::error!("{message}");
            }
            outcome.reason.status()
        }
        Err(e) => {
            log::error!("{}", error_chain(&e));
            status::RUNTIME_ERROR
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

/// The error and its sources, joined, for one clear line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
