//! Kernel modules for a kernel whose drivers are modules (a distribution kernel such as
//! Debian's cloud kernel): the ones `bulkhead exec` needs, and what they depend on, in load
//! order, for the initramfs. Dependencies come from the tree's modules.dep, or, in a tree
//! unpacked from a package (which has none: depmod makes it at install), from each module's
//! own `depends=` entry.

use std::path::{Path, PathBuf};

/// What a kernel needs loaded for `bulkhead exec` when it has them as modules: the
/// virtio-mmio transport, vsock over virtio, virtio-fs, overlayfs, and pvpanic (a panic then
/// ends the VM with its own status). A module the tree does not have is taken to be built in.
pub const NEEDED_MODULES: [&str; 5] = [
    "virtio_mmio",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "overlay",
    "pvpanic_mmio",
];

/// Module files to put in the initramfs, in load order.
#[derive(Debug, Default, Clone)]
pub struct Modules {
    pub files: Vec<PathBuf>,
}

/// One module of the tree: its name (with `_` for `-`), file, and the names it depends on.
struct Module {
    name: String,
    path: PathBuf,
    deps: Vec<String>,
}

impl Modules {
    /// The modules of `dir` (a /lib/modules/VERSION directory) that `wanted` need, each after
    /// the ones it depends on.
    pub fn resolve(dir: &Path, wanted: &[&str]) -> std::io::Result<Modules> {
        let (tree, listed) = match std::fs::read_to_string(dir.join("modules.dep")) {
            Ok(dep) => (from_modules_dep(dir, &dep), true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (from_modinfo(dir)?, false),
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}/modules.dep: {e}", dir.display()),
                ))
            }
        };
        if tree.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} holds no kernel modules",
                dir.display()
            )));
        }
        let mut order: Vec<usize> = Vec::new();
        for want in wanted {
            visit(want, &tree, &mut order, 0);
        }
        // A compressed module's dependencies are not read here: without modules.dep they
        // would be missing from the initramfs, and loading it would fail in the guest.
        if let Some(m) = order
            .iter()
            .map(|&i| &tree[i])
            .find(|m| !listed && !m.path.to_string_lossy().ends_with(".ko"))
        {
            return Err(std::io::Error::other(format!(
                "{} is compressed and {} has no modules.dep: run `depmod -b ROOT VERSION` on the tree first",
                m.path.display(),
                dir.display()
            )));
        }
        Ok(Modules {
            files: order.into_iter().map(|i| tree[i].path.clone()).collect(),
        })
    }
}

/// The host's module tree for `kernel`, when it is a bzImage whose version (from its setup
/// header) names a directory under /lib/modules: the host runs, or has installed, the same
/// kernel, so its modules fit.
pub fn host_tree_for(kernel: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = vec![0u8; 64 << 10];
    let mut file = std::fs::File::open(kernel).ok()?;
    let n = file.read(&mut head).ok()?;
    head.truncate(n);
    let version = bzimage_version(&head)?;
    let dir = Path::new("/lib/modules").join(version);
    dir.is_dir().then_some(dir)
}

/// The first word of a bzImage's kernel_version string (boot protocol 2.00+: a pointer at
/// 0x20e, relative to 0x200, in the setup code).
fn bzimage_version(head: &[u8]) -> Option<String> {
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let at = u16::from_le_bytes(head.get(0x20e..0x210)?.try_into().ok()?);
    if at == 0 {
        return None;
    }
    let text = head.get(usize::from(at) + 0x200..)?;
    let end = text.iter().position(|&b| b == 0 || b == b' ')?;
    let version = std::str::from_utf8(text.get(..end)?).ok()?;
    // One path component, nothing else.
    (!version.is_empty() && !version.contains('/') && version != "." && version != "..")
        .then(|| version.to_string())
}

/// Puts module `name` after everything it depends on; a name the tree lacks is built in.
fn visit(name: &str, tree: &[Module], order: &mut Vec<usize>, depth: usize) {
    let Some(index) = tree.iter().position(|m| m.name == name) else {
        return;
    };
    if order.contains(&index) || depth > 64 {
        return;
    }
    for dep in &tree[index].deps {
        visit(dep, tree, order, depth + 1);
    }
    order.push(index);
}

/// `kernel/fs/fuse/virtio-fs.ko.xz` is `virtio_fs`.
fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn from_modules_dep(dir: &Path, dep: &str) -> Vec<Module> {
    dep.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some(Module {
                name: name_of(module.trim()),
                path: dir.join(module.trim()),
                deps: deps.split_whitespace().map(name_of).collect(),
            })
        })
        .collect()
}

/// Every module file under `dir`, with the dependencies its `.modinfo` names. A compressed
/// module's are not read: it is taken to depend on nothing.
fn from_modinfo(dir: &Path) -> std::io::Result<Vec<Module>> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(at) = dirs.pop() {
        for entry in std::fs::read_dir(&at)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() && file.contains(".ko") {
                let deps = if file.ends_with(".ko") {
                    depends(&std::fs::read(&path)?)
                } else {
                    Vec::new()
                };
                found.push(Module {
                    name: name_of(&file),
                    path,
                    deps,
                });
            }
        }
    }
    Ok(found)
}

/// The `depends=a,b` entry of a module's `.modinfo` section, as names.
fn depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[at + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_names(modules: &Modules) -> Vec<String> {
        modules
            .files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn modules_come_after_the_ones_they_depend_on_and_built_in_ones_are_skipped() {
        let dir = std::env::temp_dir().join(format!("bulkhead-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko\n\
             kernel/fs/fuse/fuse.ko:\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vsock.ko:\n",
        )
        .unwrap();
        let modules = Modules::resolve(&dir, &NEEDED_MODULES).unwrap();
        // virtio_mmio and overlay are not listed: built in.
        assert_eq!(
            file_names(&modules),
            [
                "vsock.ko",
                "vmw_vsock_virtio_transport_common.ko",
                "vmw_vsock_virtio_transport.ko",
                "fuse.ko",
                "virtiofs.ko"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bzimages_version_is_read_from_its_setup_header() {
        let mut head = vec![0u8; 0x1000];
        head[0x202..0x206].copy_from_slice(b"HdrS");
        head[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        head[0x500..0x500 + 26].copy_from_slice(b"6.1.0-57-cloud-amd64 (deb)");
        assert_eq!(
            bzimage_version(&head).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        // Not a bzImage, no version, or one that is not a single name.
        assert_eq!(bzimage_version(&head[..0x100]), None);
        head[0x500..0x508].copy_from_slice(b"../etc \0");
        assert_eq!(bzimage_version(&head), None);
        head[0x20e..0x210].copy_from_slice(&[0, 0]);
        assert_eq!(bzimage_version(&head), None);
    }

    #[test]
    fn a_tree_without_modules_dep_is_read_from_each_modules_own_depends_entry() {
        let dir = std::env::temp_dir().join(format!("bulkhead-modinfo-{}", std::process::id()));
        let fuse = dir.join("kernel/fs/fuse");
        std::fs::create_dir_all(&fuse).unwrap();
        std::fs::write(
            fuse.join("virtiofs.ko"),
            b"\x7fELF..\0license=GPL\0depends=fuse\0vermagic=6.1\0",
        )
        .unwrap();
        std::fs::write(fuse.join("fuse.ko"), b"\x7fELF..\0depends=\0").unwrap();
        let modules = Modules::resolve(&dir, &["virtiofs"]).unwrap();
        assert_eq!(file_names(&modules), ["fuse.ko", "virtiofs.ko"]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            Modules::resolve(&dir, &["virtiofs"]).is_err(),
            "a missing tree"
        );
    }
}
