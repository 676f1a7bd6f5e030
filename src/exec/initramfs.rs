//! The initramfs `bulkhead exec` boots with, made on the fly: bulkhead's static guest init
//! (src/exec/init.c, built by build.rs), the command's spec, the directories init mounts on,
//! and for a kernel whose drivers are modules, those modules and the order to load them in.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

pub use super::modules::Modules;

/// The guest init program (a static binary, about 700 KB): in a section of its own rather
/// than `.rodata`, where it sat between the constants every VM reads and kept them 700 KB apart,
/// so that each process mapped one more 64 KiB window of them (fault-around) than needed.
#[link_section = ".bulkhead.exec_init"]
static INIT_IMAGE: [u8; INIT_LEN] = *include_bytes!(concat!(env!("OUT_DIR"), "/exec-init"));
const INIT_LEN: usize = include_bytes!(concat!(env!("OUT_DIR"), "/exec-init")).len();
static INIT: &[u8] = &INIT_IMAGE;

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
