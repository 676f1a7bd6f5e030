//! Loading the kernel, initrd and command line, and writing the boot information the kernel
//! reads (Linux zero page or PVH start info).
//!
//! Any static ELF64 with a 64-bit entry point boots like a vmlinux; an ELF with a PVH note is
//! entered through PVH instead; anything else must be a bzImage, whose kernel bulkhead unpacks
//! itself when it can ([`unpack`]).

mod unpack;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::vstate::dirty::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Error as ElfError, PvhBootCapability};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout;
use crate::arch::x86_64::regs::EntryMode;

/// The boot protocol's magic numbers.
const BOOT_FLAG: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_UNDEFINED: u8 = 0xff;
const PVH_MAGIC: u32 = 0x336e_c578;
/// The 64-bit entry point is 0x200 past the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Where an initrd may go when the kernel does not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;
/// What bulkhead puts on every command line, before the user's part, so the user can override.
/// `reboot=a` makes a reboot go through the ACPI reset register first, then the i8042 (a kernel
/// without ACPI skips straight to the i8042); `pci=off` because the machine has no PCI, so a
/// kernel does not probe for it.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=a pci=off";

/// Errors while loading what the guest boots from.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF kernel nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    #[error("initrd {path} is {size} bytes but only {room} bytes of RAM are free for it; give the VM more memory")]
    InitrdTooBig { path: PathBuf, size: u64, room: u64 },
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot unpack kernel {path}: {source}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("cannot build the kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the memory map has {0} entries, more than the boot tables hold")]
    MemoryMapTooBig(usize),
}

impl BootError {
    /// True when the error lies in what the user gave (a bad file), not in the VMM.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            BootError::GuestWrite { .. } | BootError::MemoryMapTooBig(_)
        )
    }
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// A boot input file, opened before anything else is set up so a bad path is reported first.
#[derive(Debug)]
pub struct BootFile {
    pub path: PathBuf,
    pub file: File,
}

impl BootFile {
    /// Opens `path`; `what` names it in errors ("kernel", "initrd").
    pub fn open(what: &'static str, path: &Path) -> Result<BootFile, BootError> {
        BootFile::open_with(what, path, false)
    }

    /// [`BootFile::open`], refusing a symlink as the file itself when `no_follow`.
    pub fn open_with(
        what: &'static str,
        path: &Path,
        no_follow: bool,
    ) -> Result<BootFile, BootError> {
        let open_err = |source| BootError::Open {
            what,
            path: path.to_path_buf(),
            source,
        };
        // Non-blocking, so a FIFO can not hang start-up; it is refused below, before any read.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(
                libc::O_NONBLOCK | libc::O_CLOEXEC | if no_follow { libc::O_NOFOLLOW } else { 0 },
            )
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(open_err(std::io::Error::other("not a regular file")));
        }
        Ok(BootFile {
            path: path.to_path_buf(),
            file,
        })
    }
}

/// Loads the kernel into `mem`. A bzImage's kernel is unpacked here when bulkhead can (see
/// [`unpack`]), with `kaslr` giving the random bits that place it (None: `nokaslr`) and
/// `initrd_size` the bytes to leave room for above it.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &mut BootFile,
    kaslr: Option<fn() -> u64>,
    initrd_size: Option<u64>,
) -> Result<LoadedKernel, BootError> {
    let path = kernel.path.as_path();
    let file = &mut kernel.file;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let kernel_err = |source| BootError::Kernel {
        path: path.to_path_buf(),
        source,
    };
    match Elf::load(mem, None, file, himem) {
        Ok(result) => {
            let (entry, mode) = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr.0, EntryMode::Pvh),
                _ => (result.kernel_load.0, EntryMode::Linux64),
            };
            Ok(LoadedKernel {
                entry,
                mode,
                end: result.kernel_end,
                setup_header: None,
            })
        }
        Err(loader::Error::Elf(ElfError::InvalidElfMagicNumber)) => {
            match BzImage::load(mem, None, file, himem) {
                Ok(result) => {
                    let unpacked = match &result.setup_header {
                        Some(hdr) => unpack::unpack_bzimage(
                            mem,
                            (result.kernel_load.0, result.kernel_end),
                            hdr,
                            kaslr,
                            initrd_size.map(|size| (size, initrd_limit(Some(hdr)))),
                        )
                        .map_err(|source| BootError::Unpack {
                            path: path.to_path_buf(),
                            source,
                        })?,
                        None => None,
                    };
                    Ok(match unpacked {
                        Some(u) => {
                            log::debug!(
                                "unpacked {} ({:?}) at {:#x}; virtual base moved by {:#x}{}",
                                path.display(),
                                u.format,
                                u.load_addr,
                                u.virt_offset,
                                if u.kaslr { " (KASLR)" } else { "" }
                            );
                            LoadedKernel {
                                entry: u.entry,
                                mode: EntryMode::Linux64,
                                end: u.end.max(result.kernel_end),
                                setup_header: result.setup_header.map(|mut hdr| {
                                    if u.kaslr {
                                        hdr.loadflags |= unpack::KASLR_FLAG;
                                    }
                                    hdr
                                }),
                            }
                        }
                        None => LoadedKernel {
                            entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                            mode: EntryMode::Linux64,
                            end: decompressor_end(result.kernel_end, result.setup_header.as_ref()),
                            setup_header: result.setup_header,
                        },
                    })
                }
                Err(loader::Error::Bzimage(_)) if !looks_like_bzimage(file) => {
                    Err(BootError::NotAKernel {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) => Err(kernel_err(e)),
            }
        }
        Err(e) => Err(kernel_err(e)),
    }
}

/// Where the memory a bzImage's own decompressor may write ends: its loaded image, and from
/// boot protocol 2.10 on the `init_size` bytes from its preferred address, where it unpacks
/// the kernel when it does not choose a place itself. The initrd goes above it.
fn decompressor_end(loaded_end: u64, hdr: Option<&setup_header>) -> u64 {
    match hdr {
        Some(hdr) if hdr.version >= 0x020a => {
            loaded_end.max(hdr.pref_address.saturating_add(u64::from(hdr.init_size)))
        }
        _ => loaded_end,
    }
}

/// The address an initrd must end below: the kernel's `initrd_addr_max` (boot protocol 2.03 on)
/// or the protocol's old default.
fn initrd_limit(hdr: Option<&setup_header>) -> u64 {
    match hdr {
        Some(hdr) if hdr.version >= 0x203 => u64::from(hdr.initrd_addr_max) + 1,
        _ => DEFAULT_INITRD_ADDR_MAX + 1,
    }
}

/// Whether the user's command line leaves KASLR on (no `nokaslr` among the kernel's
/// arguments; what follows `--` is init's).
pub fn kaslr_wanted(user_cmdline: &str) -> bool {
    let (kernel_args, _) = split_init_args(user_cmdline);
    !kernel_args.split_whitespace().any(|a| a == "nokaslr")
}

/// True when the file has the "HdrS" setup-header magic, so a load failure is about a broken
/// bzImage rather than a file of some other kind.
fn looks_like_bzimage(file: &mut File) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut magic).is_ok()
        && u32::from_le_bytes(magic) == HDR_MAGIC
}

/// Places the initrd at the highest page-aligned address it fits below the MMIO gap (and below
/// the kernel's limit), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut BootFile,
    mem_bytes: u64,
    kernel: &LoadedKernel,
) -> Result<LoadedInitrd, BootError> {
    let path = initrd.path.as_path();
    let file = &mut initrd.file;
    let initrd_err = |source| BootError::Initrd {
        path: path.to_path_buf(),
        source,
    };
    let size = file.seek(SeekFrom::End(0)).map_err(initrd_err)?;
    file.rewind().map_err(initrd_err)?;
    let limit = initrd_limit(kernel.setup_header.as_ref());
    let top = layout::low_ram_end(mem_bytes).min(limit);
    let floor = kernel
        .end
        .max(layout::HIMEM_START)
        .next_multiple_of(PAGE_SIZE);
    let room = top.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
            room,
        });
    }
    let addr = (top - size) & !(PAGE_SIZE - 1);
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        room,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| initrd_err(std::io::Error::other(e.to_string())))?;
    Ok(LoadedInitrd { addr, size })
}

/// Builds the full command line: bulkhead's part, then the user's boot arguments, then the
/// user's init arguments (everything after ` -- `).
pub fn build_cmdline(user: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE)?;
    cmdline.insert_str(BASE_CMDLINE)?;
    for item in extra {
        cmdline.insert_str(item)?;
    }
    let (boot, init) = split_init_args(user);
    if !boot.trim().is_empty() {
        cmdline.insert_str(boot.trim())?;
    }
    if let Some(init) = init {
        cmdline.insert_init_args(init.trim())?;
    }
    Ok(cmdline)
}

/// Splits `user` at its first standalone `--`.
fn split_init_args(user: &str) -> (&str, Option<&str>) {
    let trimmed = user.trim_start();
    if let Some(rest) = trimmed.strip_prefix("--") {
        if rest.is_empty() || rest.starts_with(' ') {
            return ("", Some(rest));
        }
    }
    match user.find(" -- ") {
        Some(i) => (&user[..i], Some(&user[i + 4..])),
        None => match user.strip_suffix(" --") {
            Some(boot) => (boot, Some("")),
            None => (user, None),
        },
    }
}

/// Writes the command line and the boot information for `kernel` into guest memory.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    initrd: Option<&LoadedInitrd>,
    cmdline: &Cmdline,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let cmdline_bytes = cmdline.as_cstring()?.into_bytes_with_nul();
    mem.write_slice(&cmdline_bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|source| BootError::GuestWrite {
            what: "command line",
            source,
        })?;
    let cmdline_len = cmdline_bytes.len().saturating_sub(1) as u32;
    match kernel.mode {
        EntryMode::Linux64 => write_zero_page(mem, mem_bytes, kernel, initrd, cmdline_len, rsdp),
        EntryMode::Pvh => write_pvh_info(mem, mem_bytes, initrd, rsdp),
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    initrd: Option<&LoadedInitrd>,
    cmdline_len: u32,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        // Boot protocol 2.14's pointer; older kernels scan for the RSDP where it is anyway.
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.header = HDR_MAGIC;
            params.hdr.kernel_alignment = 0x0100_0000;
        }
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = layout::memory_map(mem_bytes);
    if map.len() > params.e820_table.len() {
        return Err(BootError::MemoryMapTooBig(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| BootError::GuestWrite {
            what: "zero page",
            source,
        })
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    initrd: Option<&LoadedInitrd>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let write_err = |what| move |source| BootError::GuestWrite { what, source };
    let map = layout::memory_map(mem_bytes);
    if map.len() > layout::PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::MemoryMapTooBig(map.len()));
    }
    for (i, entry) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind as u32,
            reserved: 0,
        };
        let addr =
            layout::PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(addr))
            .map_err(write_err("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(layout::PVH_MODLIST_START))
            .map_err(write_err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(layout::PVH_INFO_START))
        .map_err(write_err("PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn user_arguments_follow_bulkheads_and_init_arguments_come_last() {
        let c = build_cmdline("quiet exit=3 -- /bin/sh -c 'echo hi'", &[]).unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            s,
            "console=ttyS0 reboot=a pci=off quiet exit=3 -- /bin/sh -c 'echo hi'"
        );
    }

    #[test]
    fn bulkhead_additions_stay_before_the_init_separator() {
        let c = build_cmdline(
            "-- init-arg",
            &["virtio_mmio.device=4K@0xd0000000:5".to_string()],
        )
        .unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        let sep = s.find(" -- ").unwrap();
        assert!(s.find("virtio_mmio").unwrap() < sep, "{s}");
        assert!(s.ends_with("-- init-arg"));
    }

    #[test]
    fn nokaslr_among_the_kernels_words_turns_kaslr_off_but_not_among_inits() {
        assert!(kaslr_wanted("quiet panic=-1"));
        assert!(!kaslr_wanted("quiet nokaslr panic=-1"));
        assert!(!kaslr_wanted("nokaslr -- /bin/sh"));
        assert!(kaslr_wanted("quiet -- echo nokaslr"));
        assert!(kaslr_wanted("nokaslr=0x"));
    }

    #[test]
    fn initrd_stays_above_where_a_bzimages_own_decompressor_unpacks() {
        let hdr = setup_header {
            version: 0x020f,
            pref_address: 16 << 20,
            init_size: 70 << 20,
            ..Default::default()
        };
        assert_eq!(decompressor_end(15 << 20, Some(&hdr)), 86 << 20);
        let old = setup_header {
            version: 0x0209,
            ..hdr
        };
        assert_eq!(decompressor_end(15 << 20, Some(&old)), 15 << 20);
        assert_eq!(decompressor_end(15 << 20, None), 15 << 20);
    }

    #[test]
    fn empty_user_command_line_gives_the_base() {
        let c = build_cmdline("", &[]).unwrap();
        assert_eq!(c.as_cstring().unwrap().into_string().unwrap(), BASE_CMDLINE);
    }

    #[test]
    fn too_long_command_line_is_refused() {
        assert!(build_cmdline(&"a".repeat(layout::CMDLINE_MAX_SIZE), &[]).is_err());
    }

    #[test]
    fn file_that_is_neither_elf_nor_bzimage_is_named_as_such() {
        let dir = std::env::temp_dir().join(format!("bulkhead-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("junk");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let mut kernel = BootFile::open("kernel", &path).unwrap();
        let err = load_kernel(&mem(16 << 20), &mut kernel, None, None).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        assert!(err.is_bad_input());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directory_or_missing_file_is_refused_when_opened() {
        assert!(matches!(
            BootFile::open("kernel", Path::new("/")),
            Err(BootError::Open { .. })
        ));
        let err = BootFile::open("initrd", Path::new("/nonexistent/initrd")).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot open initrd /nonexistent/initrd"),
            "{err}"
        );
    }

    #[test]
    fn initrd_goes_page_aligned_at_the_top_of_low_ram_or_is_refused() {
        let dir = std::env::temp_dir().join(format!("bulkhead-initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        std::fs::write(&path, vec![7u8; 5000]).unwrap();
        let m = mem(16 << 20);
        let kernel = LoadedKernel {
            entry: 0x10_0000,
            mode: EntryMode::Linux64,
            end: 0x20_0000,
            setup_header: None,
        };
        let mut file = BootFile::open("initrd", &path).unwrap();
        let initrd = load_initrd(&m, &mut file, 16 << 20, &kernel).unwrap();
        assert_eq!(initrd.addr % PAGE_SIZE, 0);
        assert!(initrd.addr + initrd.size <= 16 << 20);
        assert!(initrd.addr >= kernel.end);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(initrd.addr + 4999)).unwrap(),
            7
        );

        let fat_kernel = LoadedKernel {
            end: (16 << 20) - 4096,
            ..kernel
        };
        let err = load_initrd(&m, &mut file, 16 << 20, &fat_kernel).unwrap_err();
        assert!(
            matches!(err, BootError::InitrdTooBig { size: 5000, .. }),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn both_boot_protocols_pass_the_rsdp() {
        let m = mem(32 << 20);
        let cmdline = build_cmdline("", &[]).unwrap();
        for mode in [EntryMode::Linux64, EntryMode::Pvh] {
            let kernel = LoadedKernel {
                entry: 0x10_0000,
                mode,
                end: 0x20_0000,
                setup_header: None,
            };
            write_boot_info(&m, 32 << 20, &kernel, None, &cmdline, Some(0xe_0000)).unwrap();
        }
        let params: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let rsdp = params.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe_0000);
        let info: hvm_start_info = m.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(info.rsdp_paddr, 0xe_0000);
    }

    #[test]
    fn zero_page_carries_the_memory_map_and_command_line() {
        let m = mem(32 << 20);
        let kernel = LoadedKernel {
            entry: 0x10_0000,
            mode: EntryMode::Linux64,
            end: 0x20_0000,
            setup_header: None,
        };
        let cmdline = build_cmdline("x=1", &[]).unwrap();
        write_boot_info(&m, 32 << 20, &kernel, None, &cmdline, None).unwrap();
        let params: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let entries = params.e820_entries;
        assert_eq!(usize::from(entries), layout::memory_map(32 << 20).len());
        let ptr = params.hdr.cmd_line_ptr;
        assert_eq!(u64::from(ptr), layout::CMDLINE_START);
        let last = params.e820_table[usize::from(entries) - 1];
        let end = last.addr + last.size;
        assert_eq!(end, 32 << 20);
    }
}
