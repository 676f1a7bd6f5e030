//! KVM's supported CPUID, asked once per boot of the host and kept in a file the supervisor
//! reads before it forks the VM process. `KVM_GET_SUPPORTED_CPUID` runs the CPUID instruction
//! for every leaf KVM knows, and on a nested host each one is a trap to the hypervisor: about
//! 0.45 ms of every VM start here, a tenth of bulkhead's start-up CPU. The answer changes only
//! with the host's kernel, CPU and KVM modules (and their parameters, fixed while a module is
//! loaded), which the file's name covers.
//!
//! The file decides which features every guest is shown, so it must come from this user:
//! it lives in a directory of the effective user's own (`/run/bulkhead/cache` for root,
//! `$XDG_RUNTIME_DIR/bulkhead/cache` otherwise, both on tmpfs and gone at the next boot), and
//! a directory or file that another user owns, that group or others may write, or that is a
//! symbolic link is not used. A file that fails its checksum is asked again and replaced.
//! Anything amiss means no cache: the VM process asks KVM itself, as without one.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};

/// The name's hash and the file's checksum: std's DefaultHasher (SipHash, fixed keys). Not a
/// defence (only this user can write the directory) but a guard against accidents; chosen
/// over sha2 and crc32fast, whose CPU feature checks run CPUID in user space, the very trap
/// this cache saves (measured: sha2 cost as much as the cache saved).
fn hash(parts: &[&[u8]]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    for p in parts {
        h.write_usize(p.len());
        h.write(p);
    }
    h.finish()
}

/// The file's first bytes; the version changes with the layout below.
const MAGIC: &[u8; 8] = b"BHCPUID\x01";
/// Far more than KVM_MAX_CPUID_ENTRIES entries take.
const MAX_FILE_BYTES: u64 = 64 << 10;

/// Why the cache could not be used (never fatal: the VM process then asks KVM).
#[derive(Debug, thiserror::Error)]
pub enum CpuidCacheError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a directory of this user's that only it may write", path.display())]
    UnsafeDir { path: PathBuf },
    #[error("{}: not a file of this user's that only it may write", path.display())]
    UnsafeFile { path: PathBuf },
    #[error("{}: damaged ({what})", path.display())]
    Damaged { path: PathBuf, what: &'static str },
    #[error("asking KVM for its supported CPUID: {0}")]
    Kvm(#[from] crate::vstate::kvm::KvmError),
    #[error("asking KVM for its supported CPUID: {0}")]
    Ioctl(#[source] kvm_ioctls::Error),
    #[error("writing the cache: {0}")]
    Write(#[from] crate::snapshot::client::ClientError),
}

/// Turns an I/O error on `path` into a [`CpuidCacheError`].
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CpuidCacheError {
    let path = path.to_path_buf();
    move |source| CpuidCacheError::Io { path, source }
}

/// KVM's supported CPUID for `kvm_device`, from this boot's cache, else asked of KVM and kept
/// for the next VM. None when neither worked (logged at debug level).
pub fn supported(kvm_device: &Path) -> Option<CpuId> {
    let dir = cache_dir()?;
    match supported_in(&dir, kvm_device) {
        Ok(cpuid) => Some(cpuid),
        Err(e) => {
            log::debug!("CPUID cache: {}", crate::error_chain(&e));
            None
        }
    }
}

fn supported_in(dir: &Path, kvm_device: &Path) -> Result<CpuId, CpuidCacheError> {
    private_dir(dir)?;
    let path = dir.join(format!("cpuid-{}", key(kvm_device)?));
    match read(&path) {
        Ok(Some(cpuid)) => return Ok(cpuid),
        Ok(None) => {}
        Err(e @ CpuidCacheError::Damaged { .. }) => log::debug!("CPUID cache: {e}; asking again"),
        Err(e) => return Err(e),
    }
    let kvm = crate::vstate::kvm::open_kvm(kvm_device)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidCacheError::Ioctl)?;
    if let Err(e) = write(&path, &cpuid) {
        log::debug!("CPUID cache: {}", crate::error_chain(&e));
    }
    Ok(cpuid)
}

/// The cache directory for the effective user, or None when it has none (no runtime
/// directory for a user other than root).
fn cache_dir() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/run/bulkhead/cache"));
    }
    let runtime = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?);
    // An empty or relative value would put the cache under the working directory.
    runtime
        .is_absolute()
        .then(|| runtime.join("bulkhead/cache"))
}

/// Makes `dir` (mode 0700) if missing, and checks it and its parent are this user's, written
/// by it alone, and no symbolic links. The directories above it that are made are 0755:
/// /run/bulkhead also holds the jail directory and serve's sockets, which other users pass.
fn private_dir(dir: &Path) -> Result<(), CpuidCacheError> {
    if let Some(parent) = dir.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io(parent))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(dir)(e)),
        _ => {}
    }
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let meta = fs::symlink_metadata(d).map_err(io(d))?;
        if !meta.file_type().is_dir() || !owned_and_private(&meta) {
            return Err(CpuidCacheError::UnsafeDir {
                path: d.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn owned_and_private(meta: &fs::Metadata) -> bool {
    // SAFETY: geteuid has no preconditions.
    meta.uid() == unsafe { libc::geteuid() } && meta.mode() & 0o022 == 0
}

/// What KVM's answer depends on, hashed: the kernel's boot, the device and the loads of the
/// KVM modules; and this build's file layout.
fn key(kvm_device: &Path) -> Result<String, CpuidCacheError> {
    let boot_id = Path::new("/proc/sys/kernel/random/boot_id");
    let rdev = fs::metadata(kvm_device)
        .map_err(io(kvm_device))?
        .rdev()
        .to_le_bytes();
    let mut parts: Vec<Vec<u8>> = vec![
        MAGIC.to_vec(),
        env!("CARGO_PKG_VERSION").as_bytes().to_vec(),
        fs::read(boot_id).map_err(io(boot_id))?,
        kvm_device.as_os_str().as_encoded_bytes().to_vec(),
        rdev.to_vec(),
    ];
    // Each KVM module as loaded now: KVM works out the CPUID it supports when its vendor module
    // loads, from the CPU and the module parameters, which can not change while it is loaded
    // (those that feed it are read-only). A module loaded again gets new sysfs directories,
    // with new inode numbers: a name and inode number stand for one load. (Reading the
    // parameters instead took 140 system calls per VM start here.)
    let mut modules: Vec<(Vec<u8>, u64)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/module") {
        for module in entries.flatten() {
            let name = module.file_name().into_encoded_bytes();
            if name.starts_with(b"kvm") {
                modules.push((name, module.ino()));
            }
        }
    }
    modules.sort();
    for (name, ino) in modules {
        parts.push(name);
        parts.push(ino.to_le_bytes().to_vec());
    }
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(format!("{:016x}", hash(&parts)))
}

/// The cached CPUID at `path`; None when there is no such file.
fn read(path: &Path) -> Result<Option<CpuId>, CpuidCacheError> {
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let meta = file.metadata().map_err(io(path))?;
    if !meta.file_type().is_file() || !owned_and_private(&meta) || meta.len() > MAX_FILE_BYTES {
        return Err(CpuidCacheError::UnsafeFile {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io(path))?;
    decode(&bytes)
        .map(Some)
        .map_err(|what| CpuidCacheError::Damaged {
            path: path.to_path_buf(),
            what,
        })
}

/// Writes `cpuid` to `path` whole or not at all: the snapshot files' [`NewFile`] (a private
/// new file beside it, never through a link, renamed over it once written, removed if not).
///
/// [`NewFile`]: crate::snapshot::client::NewFile
fn write(path: &Path, cpuid: &CpuId) -> Result<(), CpuidCacheError> {
    let new = crate::snapshot::client::NewFile::create(path)?;
    new.file().write_all(&encode(cpuid)).map_err(io(path))?;
    new.commit()?;
    Ok(())
}

/// MAGIC, the hash of the rest, then the entries (postcard).
fn encode(cpuid: &CpuId) -> Vec<u8> {
    let entries: Vec<kvm_cpuid_entry2> = cpuid.as_slice().to_vec();
    // Serialising plain integers into a Vec can not fail.
    let payload = postcard::to_stdvec(&entries).unwrap_or_default();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&hash(&[&payload]).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode(bytes: &[u8]) -> Result<CpuId, &'static str> {
    let rest = bytes.strip_prefix(MAGIC).ok_or("magic or version")?;
    let (sum, payload) = rest.split_at_checked(8).ok_or("short")?;
    let sum = u64::from_le_bytes(sum.try_into().map_err(|_| "short")?);
    if hash(&[payload]) != sum {
        return Err("checksum");
    }
    let entries: Vec<kvm_cpuid_entry2> = postcard::from_bytes(payload).map_err(|_| "entries")?;
    if entries.is_empty() || entries.len() > KVM_MAX_CPUID_ENTRIES {
        return Err("entry count");
    }
    CpuId::from_entries(&entries).map_err(|_| "entry count")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries: Vec<kvm_cpuid_entry2> = (0..5u32)
            .map(|i| kvm_cpuid_entry2 {
                function: i,
                index: 0,
                eax: 0x1000 + i,
                ebx: 2,
                ecx: 3,
                edx: 4,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&entries).unwrap()
    }

    /// A cache directory to be made, and the directory above it to remove afterwards.
    fn scratch(name: &str) -> (PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("bh-cpuid-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        (root.join("cache"), root)
    }

    #[test]
    fn a_written_cpuid_reads_back_the_same() {
        let (dir, root) = scratch("roundtrip");
        private_dir(&dir).unwrap();
        // The directory above stays passable for others (it is /run/bulkhead in use).
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o755);
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let path = dir.join("cpuid-x");
        assert!(read(&path).unwrap().is_none(), "no file yet");
        write(&path, &sample()).unwrap();
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back.as_slice(), sample().as_slice());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_damaged_or_foreign_cache_file_is_not_used() {
        let good = encode(&sample());
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(decode(&flipped).unwrap_err(), "checksum");
        assert_eq!(decode(&good[..10]).unwrap_err(), "short");
        assert_eq!(decode(b"BHCPUID\x02rest").unwrap_err(), "magic or version");

        let (dir, root) = scratch("foreign");
        private_dir(&dir).unwrap();
        let path = dir.join("cpuid-x");
        fs::write(&path, &good).unwrap();
        // Others may write it: someone else could have put it there.
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o622)).unwrap();
        assert!(matches!(
            read(&path),
            Err(CpuidCacheError::UnsafeFile { .. })
        ));
        // A symbolic link to a good file is not followed.
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let link = dir.join("cpuid-link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(read(&link).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_others_may_write_is_not_used() {
        let (dir, root) = scratch("open-dir");
        private_dir(&dir).unwrap();
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        assert!(matches!(
            private_dir(&dir),
            Err(CpuidCacheError::UnsafeDir { .. })
        ));
        fs::remove_dir_all(&root).unwrap();
    }
}
