//! The boot recipe: validated config in, a ready-to-run [`Vmm`] out.
//!
//! 1. open the kernel, initrd and disk files and the taps, so bad input is reported before
//!    anything else;
//! 2. open KVM and check it;
//! 3. create this VM's own memory: private anonymous memory, or with shares one sealed memfd
//!    mapped shared, which the shares' backends map too;
//! 4. create the VM (memslots, irqchip, PIT);
//! 5. attach devices: legacy ports (serial, i8042, bulkhead's own, and with ACPI the power
//!    registers and pvpanic), then virtio-mmio (disks, network devices, vsock, rng, shares),
//!    each with its ioeventfds and irqfd;
//! 6. load kernel, initrd and command line; write the boot tables: ACPI (devices are announced
//!    there, and on the command line only when asked or without ACPI), the MP table, the reset
//!    vector;
//! 7. create and configure the vCPUs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{Board, PortDevice, PowerRegisters, VirtioMmio};
use crate::arch::x86_64::{layout, mptable, ArchError};
use crate::boot::{BootError, BootFile};
use crate::broker::BrokerClient;
use crate::config::{ConsoleConfig, IrqChip, RateLimiterConfig, TokenBucketConfig, VmConfig};
use crate::devices::legacy::{
    self, ioapic, power, AcpiPower, BootCompletePort, GuestExitPort, IoDelayPort, Ioapic, PvPanic,
    SerialPort, VmGenId, I8042,
};
use crate::devices::virtio::block::{self, BlockError, Disk};
use crate::devices::virtio::fs::{self, FsError};
use crate::devices::virtio::net::{Net, NetQueues, Tap, TapError};
use crate::devices::virtio::rate_limiter::{RateLimiter, TokenBucket};
use crate::devices::virtio::rng::{Rng, RngQueue};
use crate::devices::virtio::vhost_user::{Backend, VhostUserError};
use crate::devices::virtio::vsock::{Vsock, VsockBackend, VsockError, VsockQueues};
use crate::devices::virtio::{
    mmio, DeviceShared, MmioTransport, QueueHandler, VirtioDevice, VirtioWorker,
};
use crate::devices::{Bus, BusError};
use crate::exit::ExitSignal;
use crate::telemetry::{DeviceTelemetry, OnViolation, Reporter};
use crate::vmm::{Control, RawTerminal, Vmm};
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{VcpuError, VcpuIo};
use crate::vstate::vm::{Vm, VmError};

mod kernel;
mod restore;

use kernel::boot;
pub use restore::RestoreError;

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot give up privileges before reading the guest's input: {0}")]
    AfterOpen(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot place a device: {0}")]
    Bus(#[from] BusError),
    #[error("cannot read KVM's supported CPUID: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("cannot take the vsock connection broker: {0}")]
    Broker(#[source] std::io::Error),
    #[error("share {tag}: {source}")]
    Share {
        tag: String,
        #[source]
        source: VhostUserError,
    },
    #[error("share {0}: the supervisor handed over no backend for it")]
    ShareBackend(String),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::RegionError),
    #[error("cannot read KVM's MSR list: {0}")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    VmGenId(#[from] crate::devices::legacy::vmgenid::VmGenIdError),
    #[error("cannot open console file {path}: {source}")]
    ConsoleFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BuildError {
    /// True when the user can fix this by changing their input or host setup (exit status 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            BuildError::Kvm(e) => e.is_bad_input(),
            BuildError::Boot(e) => e.is_bad_input(),
            BuildError::Restore(e) => e.is_bad_input(),
            BuildError::ConsoleFile { .. }
            | BuildError::Disk(_)
            | BuildError::Tap(_)
            | BuildError::Vsock(_) => true,
            _ => false,
        }
    }
}

/// What the VM process was handed besides its settings.
pub struct BuildEnv {
    /// Where counters and events go (the supervisor's telemetry region).
    pub reporter: Reporter,
    /// The console file the supervisor opened, for `--console file:PATH`.
    pub console_file: Option<File>,
    /// CLOCK_MONOTONIC nanoseconds when `bulkhead run` started: boot times count from here.
    pub start_ns: u64,
    /// Called once everything privileged is open (files, taps, the vsock socket, KVM) and
    /// before anything the guest supplied is parsed: a jailed VM process gives up its
    /// privileges here.
    pub after_open: Option<AfterOpen>,
    /// The channel the VMM's front end (the Firecracker personality) controls the running VM
    /// through: Ctrl-Alt-Del, a disk's backing file swapped.
    pub control: Option<std::os::fd::OwnedFd>,
    /// The supervisor's vsock connection broker: guest connections to host ports go through
    /// it, so the VM process never calls `connect`.
    pub broker: Option<std::os::fd::OwnedFd>,
    /// Each share's vhost-user backend, connected by the supervisor, in share order.
    pub shares: Vec<std::os::fd::OwnedFd>,
    /// KVM's supported CPUID, when the supervisor had it (crate::cpuid_cache); else the
    /// builder asks KVM.
    pub supported_cpuid: Option<kvm_bindings::CpuId>,
}

/// What [`BuildEnv::after_open`] runs.
pub type AfterOpen = Box<dyn FnOnce() -> Result<(), Box<dyn std::error::Error + Send + Sync>>>;

/// Builds the VM described by `config`, ready for [`Vmm::run`].
pub fn build_vm(config: &VmConfig, env: BuildEnv) -> Result<Vmm, BuildError> {
    // The user that started the VM, who alone (with root) may use its control socket; read
    // before a jail changes this process's credentials.
    // SAFETY: getuid has no preconditions.
    let owner = unsafe { libc::getuid() };
    let BuildEnv {
        reporter,
        console_file,
        start_ns,
        after_open,
        control,
        broker,
        shares,
        supported_cpuid,
    } = env;
    // A restore reads no kernel: the snapshot's memory holds the running guest.
    let restore = match &config.vm.restore {
        Some(spec) => Some(restore::open(spec, config)?),
        None => None,
    };
    let mut kernel_file = match restore {
        Some(_) => None,
        None => Some(BootFile::open_with(
            "kernel",
            &config.vm.kernel,
            config.process.no_follow,
        )?),
    };
    let mut initrd_file = match (&config.vm.initrd, &restore) {
        (Some(path), None) => Some(BootFile::open_with(
            "initrd",
            path,
            config.process.no_follow,
        )?),
        _ => None,
    };
    let mut disks = Vec::with_capacity(config.vm.disks.len());
    for disk in &config.vm.disks {
        disks.push((
            Disk::open_with(
                &disk.path,
                disk.read_only,
                &disk.id,
                config.process.no_follow,
            )?,
            disk.id.clone(),
        ));
    }
    let mut taps = Vec::with_capacity(config.vm.nets.len());
    for net in &config.vm.nets {
        taps.push((Tap::open(&net.tap)?, net.mac));
    }
    let vsock = match &config.vm.vsock {
        Some(v) => {
            let backend = VsockBackend::open(v.cid, &v.uds, !config.quirks.vsock_cid_shared)?
                .with_buffer_budget(v.buffer_mib << 20);
            Some(match broker {
                Some(fd) => backend.with_broker(BrokerClient::new(fd).map_err(BuildError::Broker)?),
                None => backend,
            })
        }
        None => None,
    };
    let mut share_sockets = shares.into_iter();
    let mut backends = Vec::with_capacity(config.vm.shares.len());
    for share in &config.vm.shares {
        let socket = share_sockets
            .next()
            .ok_or_else(|| BuildError::ShareBackend(share.tag.clone()))?;
        let stream = std::os::unix::net::UnixStream::from(socket);
        let backend = Backend::over(stream, fs::QUEUES).map_err(|source| BuildError::Share {
            tag: share.tag.clone(),
            source,
        })?;
        backends.push((share.tag.as_str(), backend));
    }
    let kvm = kvm::open_kvm(&config.process.kvm_device)?;
    kvm::check_vcpu_limit(&kvm, config.vm.vcpus)?;
    if let Some(lock) = after_open {
        lock().map_err(BuildError::AfterOpen)?;
    }
    // A share's backend maps guest RAM itself; nothing else may.
    let backing = if backends.is_empty() {
        memory::Backing::Private
    } else {
        memory::Backing::Shared
    };
    let (guest_memory, restore) = match restore {
        Some(r) => {
            let (mem_file, state) = r.into_parts();
            let mem =
                memory::map_snapshot(config.vm.mem_bytes(), mem_file, config.vm.track_dirty_pages)?;
            (mem, Some(state))
        }
        None => (
            memory::create_guest_memory(
                config.vm.mem_bytes(),
                backing,
                config.vm.track_dirty_pages,
            )?,
            None,
        ),
    };
    let vm = Vm::new(&kvm, guest_memory, config.vm.irqchip)?;
    if !vm.msrs_filtered() {
        log::warn!("this KVM can not filter MSRs to user space: msr_probe alerts are off");
    }

    let exit = Arc::new(ExitSignal::new().map_err(|source| BuildError::EventFd {
        what: "VM exit",
        source,
    })?);
    let (console_out, console_input) = console(&config.vm.console, console_file)?;
    let console_out: Box<dyn Write + Send> = match config.vm.console_limit {
        Some(limit) => Box::new(LimitedConsole {
            inner: console_out,
            left: limit,
            reporter: reporter.clone(),
        }),
        None => console_out,
    };
    let raw_terminal = console_input
        .as_ref()
        .and_then(|_| RawTerminal::new(libc::STDIN_FILENO));
    let serial_irq = irq_line(&vm, legacy::SERIAL_IRQ, "the serial IRQ")?;
    // A restored UART with an interrupt pending raises its line here, before the interrupt
    // controllers are restored: that edge goes nowhere (no route yet), and the one the guest
    // had not yet taken is in the restored controllers' state.
    let serial = Arc::new(match &restore {
        Some(state) => SerialPort::restored(serial_irq, console_out, &state.devices.serial)
            .ok_or(restore::RestoreError::Device("serial"))?,
        None => SerialPort::new(serial_irq, console_out),
    });
    let keyboard_irq = irq_line(&vm, legacy::I8042_IRQ, "the keyboard IRQ")?;
    let i8042 = Arc::new(I8042::new(keyboard_irq, exit.clone()));
    let mut pio = pio_bus(&serial, &i8042, &exit, &reporter, start_ns)?;
    if config.vm.acpi {
        // Only a guest the tables told about them may use them.
        acpi_ports(&mut pio, &exit, &reporter)?;
    }
    #[cfg(debug_assertions)]
    if let Some((port, base)) = crate::test_hooks::guest_port(config.test_hook) {
        pio.insert(port, base, 1)?;
    }

    let mut virtio = VirtioBus {
        names: config.vm.device_names(),
        reporter: Some(reporter.clone()),
        on_violation: config.process.supervision.on_violation,
        ..VirtioBus::default()
    };
    let mut disk_handles = Vec::with_capacity(disks.len());
    for (index, (disk, id)) in disks.into_iter().enumerate() {
        log::debug!(
            "virtio-blk{index}: id {id}, {} sectors{}",
            disk.sectors,
            if disk.read_only { ", read-only" } else { "" }
        );
        let (block, queue, handle) = block::split(disk, &id);
        let queue = queue.with_limiter(limiter(
            config.vm.disks.get(index).and_then(|d| d.rate_limiter),
        ));
        let shared = virtio.attach(&vm, Box::new(block), Box::new(queue))?;
        disk_handles.push((handle, shared));
    }
    for (index, (tap, mac)) in taps.into_iter().enumerate() {
        log::debug!(
            "virtio-net{index}: tap {}, MAC {}",
            tap.name(),
            crate::config::format_mac(&mac)
        );
        let net = config.vm.nets.get(index);
        let queues = Box::new(NetQueues::new(tap, mac).with_limiters(
            limiter(net.and_then(|n| n.rx_rate_limiter)),
            limiter(net.and_then(|n| n.tx_rate_limiter)),
        ));
        virtio.attach(&vm, Box::new(Net::new(mac)), queues)?;
    }
    if let Some(backend) = vsock {
        log::debug!(
            "virtio-vsock0: CID {}, socket {}",
            backend.cid,
            backend.uds.display()
        );
        let device = Box::new(Vsock::new(backend.cid));
        let queues = Box::new(VsockQueues::new(backend));
        virtio.attach(&vm, device, queues)?;
    }
    if config.vm.rng {
        let queue = RngQueue::with_limiter(limiter(config.vm.rng_rate_limiter));
        virtio.attach(&vm, Box::new(Rng), Box::new(queue))?;
    }
    for (tag, backend) in backends {
        let (device, queues) = fs::split(tag, backend)?;
        log::debug!("virtio-fs: tag {tag}");
        virtio.attach(&vm, Box::new(device), Box::new(queues))?;
    }

    let ioapic = if config.vm.irqchip == IrqChip::Split {
        let ioapic = Arc::new(Ioapic::new(
            mptable::apic_id(config.vm.vcpus),
            Box::new(vm.msi_routes()),
        ));
        virtio
            .bus
            .insert(ioapic.clone(), layout::IOAPIC_START, ioapic::IOAPIC_LEN)?;
        Some(ioapic)
    } else {
        None
    };

    // With ACPI, the VM generation ID: new at boot, and new again for each restore.
    let vmgenid = if config.vm.acpi {
        let irq = irq_line(&vm, legacy::GED_IRQ, "the generation change IRQ")?;
        Some(VmGenId::new(layout::VMGENID_START, irq))
    } else {
        None
    };

    let msr_list: Arc<[u32]> = kvm
        .get_msr_index_list()
        .map_err(BuildError::MsrList)?
        .as_slice()
        .into();
    let pause = Arc::new(PauseGate::new(config.vm.vcpus as usize));
    if config.process.start_paused {
        pause.start_paused();
    }
    let sources = crate::snapshot::Sources {
        vm: vm.clone(),
        serial: serial.clone(),
        i8042: i8042.clone(),
        ioapic,
        transports: virtio.transports.clone(),
        pause: pause.clone(),
        machine: config.vm.machine.clone(),
        mem_bytes: config.vm.mem_bytes(),
        shares: !config.vm.shares.is_empty(),
    };
    let vcpus = match (restore, kernel_file.as_mut()) {
        (Some(state), _) => {
            let vcpus = restore::apply(&vm, &sources, &mut virtio.workers, &state)?;
            // A clone is a new generation: the guest is told once it runs, its interrupt
            // controllers restored by now.
            if let Some(gen) = &vmgenid {
                gen.new_generation(vm.memory())?;
            }
            vcpus
        }
        (None, Some(kernel_file)) => {
            let vcpus = boot(
                config,
                &kvm,
                supported_cpuid,
                &vm,
                &virtio.windows,
                kernel_file,
                initrd_file.as_mut(),
            )?;
            if let Some(gen) = &vmgenid {
                gen.write_new(vm.memory())?;
            }
            vcpus
        }
        // Without a restore the kernel was opened above.
        (None, None) => return Err(BuildError::Restore(restore::RestoreError::NoKernel)),
    };

    // The UART's data register, held back by KVM while a write only sends its byte. Through
    // the first vCPU's file, which every VM has; without the ring, writes exit as before.
    let coalesced = match vcpus.first() {
        Some(vcpu) => match vm.coalesced_port(
            &kvm,
            vcpu,
            legacy::SERIAL_PORT_BASE as u16,
            serial.quiet_tx(),
        ) {
            Ok(ring) => ring.map(Arc::new),
            Err(e) => {
                log::debug!("serial writes not coalesced: {e}");
                None
            }
        },
        None => None,
    };
    let io = Arc::new(VcpuIo {
        pio: Arc::new(pio),
        mmio: Arc::new(virtio.bus),
        reporter,
        exit,
        pause,
        msr_list,
        coalesced,
    });
    Ok(Vmm {
        vm,
        vcpus,
        io,
        serial,
        virtio_workers: virtio.workers,
        console_input,
        raw_terminal,
        seccomp: config.process.seccomp,
        firecracker_names: config.quirks.firecracker_names,
        control: control.map(|channel| Control::new(channel, owner, i8042, disk_handles)),
        snapshot: sources,
        test_hook: config.test_hook,
    })
}

/// The virtio-mmio devices being attached, in the order the guest will find them.
#[derive(Default)]
struct VirtioBus {
    bus: Bus,
    /// Each device's register window and interrupt, for the DSDT.
    windows: Vec<VirtioMmio>,
    devices: Vec<Arc<DeviceShared>>,
    /// Each device's register side, for snapshots.
    transports: Vec<Arc<MmioTransport>>,
    workers: Vec<VirtioWorker>,
    /// Each device's name, by attach order (`VmConfig::device_names`).
    names: Vec<String>,
    reporter: Option<Reporter>,
    on_violation: OnViolation,
}

impl VirtioBus {
    /// Places `device` in the next register block and IRQ, with an ioeventfd per queue (so a
    /// notification never stops a vCPU) and an irqfd, and gives its queues to `handler`.
    fn attach(
        &mut self,
        vm: &Vm,
        device: Box<dyn VirtioDevice>,
        handler: Box<dyn QueueHandler>,
    ) -> Result<Arc<DeviceShared>, BuildError> {
        let index = self.devices.len();
        let name = self
            .names
            .get(index)
            .cloned()
            .unwrap_or_else(|| format!("virtio{index}"));
        let base = layout::VIRTIO_MMIO_BASE + index as u64 * layout::VIRTIO_MMIO_STRIDE;
        let irq = layout::VIRTIO_IRQ_BASE + index as u32;
        let event_fd = |what| {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::EventFd { what, source })
        };
        let irq_evt = irq_line(vm, irq, "a virtio IRQ")?;
        let telemetry = match &self.reporter {
            Some(r) => DeviceTelemetry::new(r.clone(), u16::try_from(index).unwrap_or(u16::MAX)),
            None => DeviceTelemetry::detached().map_err(BuildError::Telemetry)?,
        };
        let backend_evt_error = |source| BuildError::EventFd {
            what: "a vhost-user backend",
            source,
        };
        let backend_irq = if handler.served_elsewhere() {
            Some(irq_evt.try_clone().map_err(backend_evt_error)?)
        } else {
            None
        };
        let shared = Arc::new(DeviceShared::new(
            name,
            irq_evt,
            event_fd("a virtio state change")?,
            telemetry,
            self.on_violation,
        ));
        let notify = base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
        let mut queue_evts = Vec::new();
        let mut transport_evts = Vec::new();
        for _ in device.queue_max_sizes() {
            let evt = event_fd("a virtio queue")?;
            transport_evts.push(evt.try_clone().map_err(|source| BuildError::EventFd {
                what: "a virtio queue",
                source,
            })?);
            queue_evts.push(evt);
        }
        let mut handler = handler;
        if let Some(irq) = backend_irq {
            handler
                .take_eventfds(&queue_evts, &irq)
                .map_err(backend_evt_error)?;
            shared.interrupt.set_raised_elsewhere();
        }
        let mem = vm.memory().clone();
        let transport =
            MmioTransport::new(device, shared.clone(), mem.clone()).notify_by(transport_evts);
        let transport = Arc::new(transport);
        self.bus.insert(transport.clone(), base, mmio::MMIO_LEN)?;
        self.transports.push(transport);
        self.windows.push(VirtioMmio {
            base,
            size: mmio::MMIO_LEN,
            gsi: irq,
        });
        self.workers.push(
            VirtioWorker::new(shared.clone(), mem, queue_evts, handler)
                .map_err(|source| BuildError::EventFd {
                    what: "a virtio worker",
                    source,
                })?
                .with_notifiers(Box::new(vm.queue_notifiers(notify))),
        );
        self.devices.push(shared.clone());
        Ok(shared)
    }
}

/// The device-side rate limiter for validated settings (None: no limit).
fn limiter(config: Option<RateLimiterConfig>) -> Option<RateLimiter> {
    let config = config?;
    let now = std::time::Instant::now();
    let bucket = |b: Option<TokenBucketConfig>| {
        b.and_then(|b| {
            let refill = std::time::Duration::from_millis(b.refill_time);
            TokenBucket::new(b.size, b.one_time_burst, refill, now)
        })
    };
    RateLimiter::new(bucket(config.bandwidth), bucket(config.ops))
}

/// An eventfd that raises `gsi` when written (an irqfd); `what` names it in errors.
fn irq_line(vm: &Vm, gsi: u32, what: &'static str) -> Result<EventFd, BuildError> {
    let evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::EventFd { what, source })?;
    vm.register_irqfd(&evt, gsi)?;
    Ok(evt)
}

fn pio_bus(
    serial: &Arc<SerialPort>,
    i8042: &Arc<I8042>,
    exit: &Arc<ExitSignal>,
    reporter: &Reporter,
    start_ns: u64,
) -> Result<Bus, BuildError> {
    let mut pio = Bus::new();
    pio.insert(
        serial.clone(),
        legacy::SERIAL_PORT_BASE,
        legacy::SERIAL_PORT_LEN,
    )?;
    pio.insert(
        i8042.clone(),
        legacy::I8042_PORT_BASE,
        legacy::I8042_PORT_LEN,
    )?;
    pio.insert(
        Arc::new(GuestExitPort(exit.clone())),
        legacy::GUEST_EXIT_PORT,
        1,
    )?;
    pio.insert(
        Arc::new(BootCompletePort::new(reporter.clone(), start_ns)),
        legacy::BOOT_COMPLETE_PORT,
        1,
    )?;
    pio.insert(Arc::new(IoDelayPort), legacy::IO_DELAY_PORT, 1)?;
    Ok(pio)
}

/// The devices only the ACPI tables announce: the power registers and pvpanic.
fn acpi_ports(
    pio: &mut Bus,
    exit: &Arc<ExitSignal>,
    reporter: &Reporter,
) -> Result<(), BuildError> {
    pio.insert(
        Arc::new(AcpiPower::new(exit.clone())),
        legacy::POWER_PORT_BASE,
        power::POWER_PORTS_LEN,
    )?;
    pio.insert(
        Arc::new(PvPanic::new(exit.clone(), reporter.clone())),
        legacy::PVPANIC_PORT,
        1,
    )?;
    Ok(())
}

/// What the ACPI tables describe: the legacy devices `pio_bus` places, the virtio devices and
/// the VM generation ID.
fn board(vcpus: u32, virtio: &[VirtioMmio]) -> Board {
    // The legacy ports are all below 0x1000, so they fit the descriptors' 16 bits.
    let port = |p: u64| p as u16;
    Board {
        vcpus,
        serial: PortDevice {
            base: port(legacy::SERIAL_PORT_BASE),
            len: legacy::SERIAL_PORT_LEN as u8,
            gsi: legacy::SERIAL_IRQ,
        },
        i8042: (
            port(legacy::I8042_PORT_BASE),
            u16::from(legacy::I8042_COMMAND_PORT),
            legacy::I8042_IRQ,
        ),
        pvpanic_port: port(legacy::PVPANIC_PORT),
        power: PowerRegisters {
            sleep_control: port(legacy::POWER_PORT_BASE + power::SLEEP_CONTROL),
            sleep_status: port(legacy::POWER_PORT_BASE + power::SLEEP_STATUS),
            reset: port(legacy::POWER_PORT_BASE + power::RESET),
            reset_value: power::RESET_VALUE,
            s5_sleep_type: power::S5_SLEEP_TYPE,
        },
        virtio: virtio.to_vec(),
        vmgenid: Some((layout::VMGENID_START, legacy::GED_IRQ)),
    }
}

/// The console's output sink and, for stdio, its input source. A console file the
/// supervisor opened (`opened`) is used as it is.
fn console(
    config: &ConsoleConfig,
    opened: Option<File>,
) -> Result<(Box<dyn Write + Send>, Option<File>), BuildError> {
    if let (ConsoleConfig::File(_), Some(file)) = (config, opened) {
        return Ok((Box::new(file), None));
    }
    match config {
        ConsoleConfig::Stdio => {
            let stdin = dup_stdin();
            Ok((Box::new(std::io::stdout()), stdin))
        }
        ConsoleConfig::None => Ok((Box::new(std::io::sink()), None)),
        ConsoleConfig::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::ConsoleFile {
                    path: path.clone(),
                    source,
                })?;
            Ok((Box::new(file), None))
        }
    }
}

/// Console output up to a limit: what the guest writes past it is dropped and counted, so a
/// guest looping on the UART can not fill the host's disk.
struct LimitedConsole {
    inner: Box<dyn Write + Send>,
    left: u64,
    reporter: Reporter,
}

impl Write for LimitedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let take = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if let Some(part) = buf.get(..take).filter(|p| !p.is_empty()) {
            let written = self.inner.write(part)?;
            self.left = self.left.saturating_sub(written as u64);
            if written < take {
                return Ok(written);
            }
        }
        if take < buf.len() {
            let dropped = (buf.len() - take) as u64;
            self.reporter
                .region()
                .add_vm(crate::telemetry::VmCounter::ConsoleDroppedBytes, dropped);
        }
        // What is past the limit is taken, as far as the guest can tell: the UART does not
        // stall on it.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A duplicate of stdin for the event loop, or None when stdin is closed or can not be
/// polled (a regular file or /dev/null never signals readiness to epoll). Looked at through
/// the descriptor itself: a jailed VM process has no /dev/stdin or /dev/null to compare with.
fn dup_stdin() -> Option<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: an all-zero stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of fd 0 writes only `st`; a failure means no stdin.
    if unsafe { libc::fstat(libc::STDIN_FILENO, &mut st) } != 0 {
        return None;
    }
    let kind = st.st_mode & libc::S_IFMT;
    let pollable = matches!(kind, libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR);
    // /dev/null is character device 1:3 on every Linux system.
    if !pollable || (kind == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)) {
        return None;
    }
    // SAFETY: dup of fd 0 has no memory effects; a negative result means no stdin.
    let fd = unsafe { libc::dup(libc::STDIN_FILENO) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor that only this File owns.
    Some(unsafe { File::from_raw_fd(fd) })
}
