//! Opening KVM and checking it can run a bulkhead VM.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

/// What bulkhead needs from KVM, and why.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel interrupt controllers"),
    (Cap::Irqfd, "interrupt injection by eventfd"),
    (Cap::Ioeventfd, "device notification by eventfd"),
    (Cap::UserMemory, "guest memory slots"),
    (Cap::SetTssAddr, "TSS placement"),
    (Cap::Pit2, "the in-kernel PIT"),
    (Cap::ImmediateExit, "race-free vCPU kicks"),
    (Cap::ExtCpuid, "CPUID configuration"),
];

/// Errors opening or checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open {path}: it does not exist. Load the KVM module (modprobe kvm_intel or kvm_amd) on a host with virtualization enabled, or run inside the nested lane (scripts/nested-kvm)")]
    Missing { path: PathBuf },
    #[error("cannot open {path}: permission denied. Add your user to the group that owns it (usually kvm) or run as root")]
    Permission { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{path} speaks KVM API version {0}, bulkhead needs {KVM_API_VERSION}", path = .1.display())]
    ApiVersion(i32, PathBuf),
    #[error("KVM lacks {what} (capability {cap:?})")]
    MissingCap { cap: Cap, what: &'static str },
    #[error("{requested} vCPUs asked for, but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u32, max: usize },
}

impl KvmError {
    /// True when the user can fix it by changing what they asked for or their host setup.
    pub fn is_bad_input(&self) -> bool {
        true
    }
}

/// Opens the KVM device at `path` and checks its API and capabilities.
pub fn open_kvm(path: &Path) -> Result<Kvm, KvmError> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmError::Missing {
        path: path.to_path_buf(),
    })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|source| match source.errno() {
        libc::ENOENT => KvmError::Missing {
            path: path.to_path_buf(),
        },
        libc::EACCES | libc::EPERM => KvmError::Permission {
            path: path.to_path_buf(),
        },
        _ => KvmError::Open {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(version, path.to_path_buf()));
    }
    for &(cap, what) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap { cap, what });
        }
    }
    Ok(kvm)
}

/// Checks `vcpus` against KVM's limit.
pub fn check_vcpu_limit(kvm: &Kvm, vcpus: u32) -> Result<(), KvmError> {
    let max = kvm.get_max_vcpus();
    if usize::try_from(vcpus).map_or(true, |n| n > max) {
        return Err(KvmError::TooManyVcpus {
            requested: vcpus,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_reported_with_a_fix() {
        let err = open_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmError::Missing { .. }));
        assert!(err.to_string().contains("modprobe"));
    }

    #[test]
    fn a_file_that_is_not_kvm_is_refused() {
        // /dev/null opens but answers no KVM ioctl.
        assert!(open_kvm(Path::new("/dev/null")).is_err());
    }
}
