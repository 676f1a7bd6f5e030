//! The initramfs `bulkhead exec` boots with, made on the fly: bulkhead's static guest init
//! (src/exec/init.c, built by build.rs), the command's spec, the directories init mounts on,
//! and for a kernel whose drivers are modules, those modules and the order to load them in.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The guest init program.
const INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/exec-init"));

/// The virtio-fs tag of the host's root; extra shares are `share0`, `share1`, ...
pub const ROOT_TAG: &str = "root";

/// What the guest runs, and as whom: /exec.spec, as init reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Extra shares: (tag, the path it is mounted at, writable).
    pub shares: Vec<(String, PathBuf, bool)>,
    /// `NAME=VALUE` entries.
    pub env: Vec<OsString>,
    pub argv: Vec<OsString>,
}

impl Spec {
    /// The spec's bytes: NUL-terminated fields in the order init.c reads them.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut field = |bytes: &[u8]| {
            out.extend_from_slice(bytes);
            out.push(0);
        };
        field(b"1");
        field(self.cwd.as_os_str().as_bytes());
        field(self.uid.to_string().as_bytes());
        field(self.gid.to_string().as_bytes());
        field(self.groups.len().to_string().as_bytes());
        for g in &self.groups {
            field(g.to_string().as_bytes());
        }
        field(self.shares.len().to_string().as_bytes());
        for (tag, path, writable) in &self.shares {
            field(tag.as_bytes());
            field(path.as_os_str().as_bytes());
            field(if *writable { b"rw" } else { b"ro" });
        }
        field(self.env.len().to_string().as_bytes());
        for e in &self.env {
            field(e.as_bytes());
        }
        field(self.argv.len().to_string().as_bytes());
        for a in &self.argv {
            field(a.as_bytes());
        }
        out
    }
}

/// Kernel modules for the initramfs: files to put under /modules, in load order.
#[derive(Debug, Default, Clone)]
pub struct Modules {
    pub files: Vec<PathBuf>,
}

/// A newc archive being written, numbering its entries.
struct Archive<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Archive<W> {
    fn add(&mut self, entry: cpio::NewcBuilder, name: &str, data: &[u8]) -> std::io::Result<()> {
        self.ino += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| std::io::Error::other(format!("{name} is too large")))?;
        let mut w = entry.ino(self.ino).nlink(1).write(&mut self.out, size);
        w.write_all(data)?;
        w.finish()?;
        Ok(())
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.add(cpio::NewcBuilder::new(name).mode(mode), name, data)
    }
}

/// Writes the initramfs (newc cpio, uncompressed: it is small and read once) to `out`.
pub fn write(out: impl Write, spec: &Spec, modules: &Modules) -> std::io::Result<()> {
    const DIR: u32 = 0o040755;
    const EXEC: u32 = 0o100755;
    const FILE: u32 = 0o100644;
    let mut archive = Archive { out, ino: 0 };
    for dir in ["dev", "proc", "sys", "newroot", "overlay", "modules"] {
        archive.file(dir, DIR, b"")?;
    }
    // The kernel opens /dev/console as init's stdio before init runs (devtmpfs comes later):
    // without the node init would start with descriptors 0-2 closed.
    let console = cpio::NewcBuilder::new("dev/console")
        .mode(0o020600)
        .rdev_major(5)
        .rdev_minor(1);
    archive.add(console, "dev/console", b"")?;
    archive.file("init", EXEC, INIT)?;
    archive.file("exec.spec", FILE, &spec.encode())?;
    let mut order = Vec::new();
    for file in &modules.files {
        let name = file
            .file_name()
            .map(OsStr::to_os_string)
            .ok_or_else(|| std::io::Error::other(format!("{} has no file name", file.display())))?;
        let data = std::fs::read(file)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        let name = name.to_string_lossy();
        archive.file(&format!("modules/{name}"), FILE, &data)?;
        order.extend_from_slice(name.as_bytes());
        order.push(b'\n');
    }
    if !order.is_empty() {
        archive.file("modules/order", FILE, &order)?;
    }
    cpio::newc::trailer(archive.out)?;
    Ok(())
}

/// What a kernel needs loaded for `bulkhead exec` when it has them as modules: the
/// virtio-mmio transport, vsock over virtio, virtio-fs, and overlayfs.
pub const NEEDED_MODULES: [&str; 4] = [
    "virtio_mmio",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "overlay",
];

impl Modules {
    /// The modules of `dir` (a /lib/modules/VERSION directory) that `wanted` need, each after
    /// the ones it depends on, from its modules.dep. A module not listed there is taken to be
    /// built into the kernel.
    pub fn resolve(dir: &Path, wanted: &[&str]) -> std::io::Result<Modules> {
        let dep = std::fs::read_to_string(dir.join("modules.dep")).map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}/modules.dep: {e}", dir.display()))
        })?;
        let entries: Vec<(&str, Vec<&str>)> = dep
            .lines()
            .filter_map(|line| {
                let (module, deps) = line.split_once(':')?;
                Some((module.trim(), deps.split_whitespace().collect()))
            })
            .collect();
        let name_of = |path: &str| {
            let file = path.rsplit('/').next().unwrap_or(path);
            file.split(".ko").next().unwrap_or(file).replace('-', "_")
        };
        let mut order: Vec<&str> = Vec::new();
        fn visit<'a>(
            path: &'a str,
            entries: &[(&'a str, Vec<&'a str>)],
            order: &mut Vec<&'a str>,
            depth: usize,
        ) {
            if order.contains(&path) || depth > 64 {
                return;
            }
            if let Some((_, deps)) = entries.iter().find(|(m, _)| *m == path) {
                for d in deps {
                    visit(d, entries, order, depth + 1);
                }
            }
            order.push(path);
        }
        for want in wanted {
            if let Some((path, _)) = entries.iter().find(|(m, _)| name_of(m) == *want) {
                visit(path, &entries, &mut order, 0);
            }
        }
        Ok(Modules {
            files: order.into_iter().map(|p| dir.join(p)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_lists_every_field_nul_terminated_in_the_order_init_reads_them() {
        let spec = Spec {
            cwd: PathBuf::from("/work"),
            uid: 1000,
            gid: 100,
            groups: vec![100, 27],
            shares: vec![("share0".into(), PathBuf::from("/data"), true)],
            env: vec!["PATH=/usr/bin".into()],
            argv: vec!["sh".into(), "-c".into(), "exit 7".into()],
        };
        let text = spec.encode();
        let fields: Vec<&[u8]> = text
            .strip_suffix(b"\0")
            .unwrap()
            .split(|&b| b == 0)
            .collect();
        let expected: Vec<&[u8]> = vec![
            b"1",
            b"/work",
            b"1000",
            b"100",
            b"2",
            b"100",
            b"27",
            b"1",
            b"share0",
            b"/data",
            b"rw",
            b"1",
            b"PATH=/usr/bin",
            b"3",
            b"sh",
            b"-c",
            b"exit 7",
        ];
        assert_eq!(fields, expected);
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
        let names: Vec<String> = modules
            .files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // virtio_mmio and overlay are not listed: built in.
        assert_eq!(
            names,
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
    fn the_initramfs_holds_init_the_spec_and_the_mount_points() {
        let spec = Spec {
            cwd: PathBuf::from("/"),
            uid: 0,
            gid: 0,
            groups: vec![],
            shares: vec![],
            env: vec![],
            argv: vec!["true".into()],
        };
        let mut archive = Vec::new();
        write(&mut archive, &spec, &Modules::default()).unwrap();
        let mut names = Vec::new();
        let mut rest = std::io::Cursor::new(archive);
        loop {
            let reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            names.push((reader.entry().name().to_string(), reader.entry().mode()));
            if reader.entry().name() == "init" {
                assert_eq!(reader.entry().file_size() as usize, INIT.len());
            }
            rest = reader.finish().unwrap();
        }
        for (name, mode) in [
            ("init", 0o100755),
            ("exec.spec", 0o100644),
            ("newroot", 0o040755),
        ] {
            assert!(
                names.contains(&(name.to_string(), mode)),
                "{name} in {names:?}"
            );
        }
        assert!(!names.iter().any(|(n, _)| n == "modules/order"));
    }
}
