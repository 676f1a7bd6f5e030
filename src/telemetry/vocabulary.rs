//! The one vocabulary of what bulkhead counts: VM counters, vCPU exit kinds, the refusal
//! reasons of each virtio layer, and the alert rules they map to.
//!
//! Every list is declared once, through [`vocabulary!`]: the enum, its exported names, its
//! `ALL` list and its count come from the same declaration, so a new reason can not be left out
//! of the counters or the exports. Each reason's rule is an exhaustive `match`, so a new reason
//! does not compile until someone decides which alert it raises.

/// Declares a fieldless enum whose variants each carry an exported name, with `ALL`, `COUNT`,
/// `name()` and `from_index()`.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[doc = $doc:literal])* $variant:ident = $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        $vis enum $name {
            $( $(#[doc = $doc])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order (their index is their position here).
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// How many values there are.
            pub const COUNT: usize = Self::ALL.len();

            /// The name used in metrics labels, alerts and logs.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            /// The position of this value in `ALL`.
            pub fn index(self) -> usize {
                self as usize
            }

            /// The value at `index` in `ALL`, if there is one: the way untrusted numbers are
            /// turned back into values.
            pub fn from_index(index: usize) -> Option<$name> {
                Self::ALL.get(index).copied()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}
pub(crate) use vocabulary;

vocabulary! {
    /// Per-VM counters outside any device.
    pub enum VmCounter {
        /// Port reads no device claims (answered with all-ones).
        PioUnassignedReads = "pio_unassigned_reads",
        /// Port writes no device claims (dropped).
        PioUnassignedWrites = "pio_unassigned_writes",
        /// MMIO reads no device claims (answered with all-ones).
        MmioUnassignedReads = "mmio_unassigned_reads",
        /// MMIO writes no device claims (dropped).
        MmioUnassignedWrites = "mmio_unassigned_writes",
        /// Accesses a device refused (bad size, offset or command).
        DeviceRefusedAccesses = "device_refused_accesses",
        /// MSR reads outside the allow-list, answered with #GP.
        MsrFilteredReads = "msr_filtered_reads",
        /// MSR writes outside the allow-list, answered with #GP.
        MsrFilteredWrites = "msr_filtered_writes",
        /// Abnormal vCPU exits: triple fault, internal error, failed entry, unknown.
        VcpuFailures = "vcpu_failures",
        /// Telemetry events dropped because the channel to the supervisor was full.
        EventsDropped = "events_dropped",
        /// Guest kernel panics reported through the pvpanic device.
        GuestPanics = "guest_panics",
        /// Guest kernels that reported a panic with a crash kernel loaded (they go on to it).
        GuestCrashLoaded = "guest_crash_loaded",
        /// Console output bytes dropped past the console limit.
        ConsoleDroppedBytes = "console_dropped_bytes",
        /// Panics of the VM process's own code (a bug in bulkhead, whatever thread).
        VmmPanics = "vmm_panics",
        /// Port writes KVM held back in its ring and bulkhead handled without an exit each.
        CoalescedPioWrites = "coalesced_pio_writes",
    }
}

vocabulary! {
    /// Why a vCPU left KVM_RUN, as counted per vCPU.
    pub enum ExitKind {
        IoIn = "io_in",
        IoOut = "io_out",
        MmioRead = "mmio_read",
        MmioWrite = "mmio_write",
        MsrRead = "msr_read",
        MsrWrite = "msr_write",
        Hlt = "hlt",
        Shutdown = "shutdown",
        InternalError = "internal_error",
        FailEntry = "fail_entry",
        SystemEvent = "system_event",
        /// A signal made KVM_RUN return (a kick), counted with the exits it interrupts.
        Interrupted = "interrupted",
        Other = "other",
    }
}

vocabulary! {
    /// Why the virtio-mmio transport refused a driver request.
    pub enum TransportViolation {
        /// A control register access not 32 bits wide and aligned.
        BadAccess = "bad_access",
        /// A status write that skips or undoes a step of the initialisation sequence.
        BadStatusTransition = "bad_status_transition",
        /// Driver features outside what the device offered, without VIRTIO_F_VERSION_1, or a
        /// feature word selector beyond the two words.
        BadFeatures = "bad_features",
        /// A feature write before the driver set DRIVER.
        FeaturesEarly = "features_early",
        /// A feature write after FEATURES_OK: renegotiating under the device.
        FeaturesLocked = "features_locked",
        /// A queue register write before FEATURES_OK.
        QueueEarly = "queue_early",
        /// A queue register write after DRIVER_OK, or to a queue already made ready.
        QueueLocked = "queue_locked",
        /// QueueNum above QueueNumMax, zero, or not a power of two.
        BadQueueSize = "bad_queue_size",
        /// QueueReady with an unset size, or a value other than 0 or 1.
        BadQueueSetup = "bad_queue_setup",
        /// QueueReady with a ring not aligned as virtio requires.
        MisalignedRing = "misaligned_ring",
        /// QueueSel or QueueNotify naming a queue that does not exist.
        NoSuchQueue = "no_such_queue",
        /// A config space write before DRIVER_OK, or one the device refused.
        ConfigWriteRefused = "config_write_refused",
        /// A read-only register written, or a write-only register read.
        WrongDirection = "wrong_direction",
        /// A queue notification before DRIVER_OK, or for a queue the driver did not make ready.
        NotifyNotReady = "notify_not_ready",
        /// DRIVER_OK with a queue the device needs not made ready.
        QueueNotReady = "queue_not_ready",
    }
}

vocabulary! {
    /// Why a descriptor chain, or a queue's rings, were refused.
    pub enum ChainViolation {
        /// A head or `next` index beyond the descriptor table.
        IndexOutOfRange = "index_out_of_range",
        /// The chain comes back to a descriptor it already used.
        Loop = "loop",
        /// More descriptors than the queue size (virtio 1.2, 2.7.5.2).
        TooManyDescriptors = "too_many_descriptors",
        /// A descriptor with length zero.
        ZeroLength = "zero_length",
        /// The buffers add up to more than the device accepts in one request.
        TooLong = "too_long",
        /// A buffer not wholly inside one guest RAM region.
        OutsideRam = "outside_ram",
        /// A buffer overlapping the queue's descriptor table, available ring or used ring.
        OverlapsRings = "overlaps_rings",
        /// A device-readable buffer after a device-writable one (virtio 1.2, 2.7.4.2).
        ReadableAfterWritable = "readable_after_writable",
        /// An indirect descriptor when VIRTIO_F_INDIRECT_DESC was not negotiated.
        IndirectNotNegotiated = "indirect_not_negotiated",
        /// INDIRECT and NEXT set together (virtio 1.2, 2.7.5.3.1).
        IndirectWithNext = "indirect_with_next",
        /// An indirect descriptor inside an indirect table.
        NestedIndirect = "nested_indirect",
        /// An indirect table that is empty, not a whole number of descriptors, too big, or not
        /// in RAM.
        BadIndirectTable = "bad_indirect_table",
        /// The queue's own rings are not wholly inside guest RAM.
        RingOutsideRam = "ring_outside_ram",
        /// The available index moved by more than the queue size since the device last looked.
        AvailIndexJump = "avail_index_jump",
    }
}

vocabulary! {
    /// Why a device refused the request in a well-formed chain. Shared by all device types.
    pub enum RequestViolation {
        /// A request header that is too short or malformed.
        BadHeader = "bad_header",
        /// A request type or operation the device does not implement or did not offer.
        Unsupported = "unsupported",
        /// A block request reaching past the end of the disk.
        OutOfRange = "out_of_range",
        /// A data length that is not whole sectors, or disagrees with the request.
        BadLength = "bad_length",
        /// A write to a read-only disk.
        ReadOnly = "read_only",
        /// No device-writable byte to put the request's status in.
        NoStatus = "no_status",
        /// A device-readable buffer where the device only writes.
        UnexpectedReadable = "unexpected_readable",
        /// A device-writable buffer where the device only reads.
        UnexpectedWritable = "unexpected_writable",
        /// A frame sent with a source MAC address that is not the VM's.
        ForeignSourceMac = "foreign_source_mac",
        /// A vsock packet from another CID than the VM's, or to another than the host.
        WrongCid = "wrong_cid",
        /// A vsock peer sending more than the credit it was given.
        CreditOverrun = "credit_overrun",
        /// A disk image format's header written to sector 0 of a raw disk.
        ImageMagic = "image_magic",
        /// The host failed the I/O (not the guest's fault, but the guest saw an error).
        HostIo = "host_io",
    }
}

/// A refusal, by the layer that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Violation {
    Transport(TransportViolation),
    Chain(ChainViolation),
    Request(RequestViolation),
}

impl Violation {
    /// The layer's name: `transport`, `chain` or `request`.
    pub fn layer(self) -> &'static str {
        match self {
            Violation::Transport(_) => "transport",
            Violation::Chain(_) => "chain",
            Violation::Request(_) => "request",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Violation::Transport(v) => v.name(),
            Violation::Chain(v) => v.name(),
            Violation::Request(v) => v.name(),
        }
    }

    /// The alert rule this refusal raises; None for refusals that are not the guest's doing.
    pub fn rule(self) -> Option<Rule> {
        match self {
            Violation::Transport(v) => Some(v.rule()),
            Violation::Chain(v) => Some(v.rule()),
            Violation::Request(v) => v.rule(),
        }
    }

    /// (layer number, reason index): the compact form events carry. Layers are 1-3.
    pub fn encode(self) -> (u8, u8) {
        match self {
            Violation::Transport(v) => (1, v as u8),
            Violation::Chain(v) => (2, v as u8),
            Violation::Request(v) => (3, v as u8),
        }
    }

    /// The inverse of [`Violation::encode`]; None for numbers no violation has.
    pub fn decode(layer: u8, reason: u8) -> Option<Violation> {
        let reason = usize::from(reason);
        match layer {
            1 => TransportViolation::from_index(reason).map(Violation::Transport),
            2 => ChainViolation::from_index(reason).map(Violation::Chain),
            3 => RequestViolation::from_index(reason).map(Violation::Request),
            _ => None,
        }
    }

    /// Every violation of every layer, in counter order.
    pub fn all() -> impl Iterator<Item = Violation> {
        let t = TransportViolation::ALL
            .iter()
            .map(|&v| Violation::Transport(v));
        let c = ChainViolation::ALL.iter().map(|&v| Violation::Chain(v));
        let r = RequestViolation::ALL.iter().map(|&v| Violation::Request(v));
        t.chain(c).chain(r)
    }
}

impl From<TransportViolation> for Violation {
    fn from(v: TransportViolation) -> Violation {
        Violation::Transport(v)
    }
}

impl From<ChainViolation> for Violation {
    fn from(v: ChainViolation) -> Violation {
        Violation::Chain(v)
    }
}

impl From<RequestViolation> for Violation {
    fn from(v: RequestViolation) -> Violation {
        Violation::Request(v)
    }
}

impl TransportViolation {
    pub fn rule(self) -> Rule {
        use TransportViolation::*;
        match self {
            FeaturesLocked | QueueLocked => Rule::VirtioReconfigAfterActivation,
            MisalignedRing => Rule::VirtioRingOutOfRam,
            BadFeatures | FeaturesEarly => Rule::VirtioFeatureViolation,
            BadAccess | BadStatusTransition | QueueEarly | BadQueueSize | BadQueueSetup
            | NoSuchQueue | ConfigWriteRefused | WrongDirection | NotifyNotReady
            | QueueNotReady => Rule::VirtioQueueConfigViolation,
        }
    }
}

impl ChainViolation {
    pub fn rule(self) -> Rule {
        use ChainViolation::*;
        match self {
            OutsideRam => Rule::VirtioDescOutOfRam,
            RingOutsideRam => Rule::VirtioRingOutOfRam,
            OverlapsRings => Rule::VirtioBufferOverlapsRing,
            AvailIndexJump => Rule::VirtioAvailIndexJump,
            IndirectNotNegotiated => Rule::VirtioFeatureViolation,
            IndexOutOfRange
            | Loop
            | TooManyDescriptors
            | ZeroLength
            | TooLong
            | ReadableAfterWritable
            | IndirectWithNext
            | NestedIndirect
            | BadIndirectTable => Rule::VirtioBadChain,
        }
    }
}

impl RequestViolation {
    pub fn rule(self) -> Option<Rule> {
        use RequestViolation::*;
        Some(match self {
            Unsupported | ReadOnly => Rule::VirtioFeatureViolation,
            BadHeader | OutOfRange | BadLength | NoStatus | UnexpectedReadable
            | UnexpectedWritable | WrongCid | CreditOverrun => Rule::VirtioMalformedPayload,
            ForeignSourceMac => Rule::NetMacSpoof,
            ImageMagic => Rule::DiskImageMagicWrite,
            HostIo => return None,
        })
    }
}

vocabulary! {
    /// Disk image formats whose header in sector 0 of a raw disk raises an alert.
    pub enum ImageFormat {
        Qcow2 = "qcow2",
        Qed = "qed",
        Vmdk = "vmdk",
        Vhd = "vhd",
        Vhdx = "vhdx",
        Vdi = "vdi",
    }
}

vocabulary! {
    /// Falco's priority scale (syslog severities 0-7).
    pub enum Priority {
        Emergency = "Emergency",
        Alert = "Alert",
        Critical = "Critical",
        Error = "Error",
        Warning = "Warning",
        Notice = "Notice",
        Informational = "Informational",
        Debug = "Debug",
    }
}

impl Priority {
    /// True when `self` is at least as severe as `other` (Emergency is the most severe).
    pub fn at_least(self, other: Priority) -> bool {
        (self as u8) <= (other as u8)
    }
}

vocabulary! {
    /// The escape-attempt alert rules. Names are part of bulkhead's interface.
    pub enum Rule {
        VirtioDescOutOfRam = "virtio_desc_out_of_ram",
        VirtioRingOutOfRam = "virtio_ring_out_of_ram",
        VirtioBufferOverlapsRing = "virtio_buffer_overlaps_ring",
        VirtioReconfigAfterActivation = "virtio_reconfig_after_activation",
        VirtioAvailIndexJump = "virtio_avail_index_jump",
        VirtioBadChain = "virtio_bad_chain",
        VirtioQueueConfigViolation = "virtio_queue_config_violation",
        VirtioFeatureViolation = "virtio_feature_violation",
        VirtioMalformedPayload = "virtio_malformed_payload",
        NetMacSpoof = "net_mac_spoof",
        DiskImageMagicWrite = "disk_image_magic_write",
        LegacyDeviceProbe = "legacy_device_probe",
        PioScan = "pio_scan",
        MmioScan = "mmio_scan",
        MsrProbe = "msr_probe",
        TripleFault = "triple_fault",
        ExitStorm = "exit_storm",
        VcpuEntryFailure = "vcpu_entry_failure",
        SeccompViolation = "seccomp_violation",
        ManagementCrossTenant = "management_cross_tenant",
        ManagementAdminOverride = "management_admin_override",
        ManagementAuditRecovered = "management_audit_recovered",
        SnapshotCrossTenant = "snapshot_cross_tenant",
    }
}

impl Rule {
    pub fn priority(self) -> Priority {
        use Rule::*;
        match self {
            VirtioDescOutOfRam
            | VirtioRingOutOfRam
            | VirtioBufferOverlapsRing
            | VirtioReconfigAfterActivation
            | DiskImageMagicWrite
            | SeccompViolation => Priority::Critical,
            VirtioAvailIndexJump
            | VirtioBadChain
            | VirtioQueueConfigViolation
            | VirtioFeatureViolation
            | VcpuEntryFailure => Priority::Error,
            VirtioMalformedPayload
            | NetMacSpoof
            | LegacyDeviceProbe
            | TripleFault
            | ManagementCrossTenant
            | ManagementAuditRecovered => Priority::Warning,
            // Loading another tenant's snapshot would hand over its memory, keys and all.
            SnapshotCrossTenant => Priority::Error,
            PioScan | MmioScan | MsrProbe | ExitStorm | ManagementAdminOverride => Priority::Notice,
        }
    }

    /// A rule about a virtio device's protocol: its default response resets the device.
    pub fn is_virtio(self) -> bool {
        self.name().starts_with("virtio_")
    }

    /// Falco-style tags: the area, and MITRE ATT&CK's "Escape to Host" where it applies.
    pub fn tags(self) -> &'static [&'static str] {
        use Rule::*;
        match self {
            VirtioDescOutOfRam
            | VirtioRingOutOfRam
            | VirtioBufferOverlapsRing
            | VirtioReconfigAfterActivation
            | VirtioAvailIndexJump
            | VirtioBadChain
            | VirtioQueueConfigViolation
            | VirtioFeatureViolation
            | VirtioMalformedPayload => {
                &["bulkhead", "virtio", "mitre_privilege_escalation", "T1611"]
            }
            NetMacSpoof => &["bulkhead", "network", "mitre_lateral_movement"],
            DiskImageMagicWrite => &["bulkhead", "storage", "mitre_privilege_escalation", "T1611"],
            LegacyDeviceProbe | PioScan | MmioScan | MsrProbe => {
                &["bulkhead", "reconnaissance", "mitre_discovery"]
            }
            TripleFault | VcpuEntryFailure => &["bulkhead", "cpu"],
            ExitStorm => &["bulkhead", "cpu", "noisy_neighbour"],
            SeccompViolation => &["bulkhead", "vmm", "mitre_privilege_escalation", "T1611"],
            ManagementCrossTenant => &["bulkhead", "management", "mitre_discovery"],
            ManagementAdminOverride => &["bulkhead", "management", "break_glass"],
            ManagementAuditRecovered => &["bulkhead", "management", "logs"],
            SnapshotCrossTenant => &["bulkhead", "management", "snapshot", "mitre_collection"],
        }
    }

    /// One line on what the rule fires on, for the README and alert text.
    pub fn description(self) -> &'static str {
        use Rule::*;
        match self {
            VirtioDescOutOfRam => "a descriptor buffer not wholly inside one RAM region",
            VirtioRingOutOfRam => "a queue ring outside guest RAM or misaligned",
            VirtioBufferOverlapsRing => "a buffer overlapping its queue's own rings",
            VirtioReconfigAfterActivation => {
                "queue or feature registers written after FEATURES_OK or DRIVER_OK"
            }
            VirtioAvailIndexJump => "the available index moved by more than the queue size",
            VirtioBadChain => {
                "a zero-length or oversized descriptor, a loop, an over-long chain or a bad indirect table"
            }
            VirtioQueueConfigViolation => {
                "queue size above the maximum or not a power of two, a notify of a missing queue, or other transport register misuse"
            }
            VirtioFeatureViolation => {
                "a request the negotiated features or the device forbid, such as a write to a read-only disk"
            }
            VirtioMalformedPayload => "a malformed block, net or vsock request or an oversized one",
            NetMacSpoof => "a frame whose source MAC is not the VM's",
            DiskImageMagicWrite => {
                "a qcow2, qed, vmdk, vhd, vhdx or vdi header written to sector 0 of a raw disk"
            }
            LegacyDeviceProbe => "I/O ports of devices bulkhead never emulates (floppy, IDE, PCI configuration, ...)",
            PioScan => "16 or more distinct unhandled ports within 1 s",
            MmioScan => "16 or more distinct unmapped guest-physical pages within 1 s",
            MsrProbe => "guest access to an MSR outside the allow-list",
            TripleFault => "a guest shutdown (triple fault)",
            ExitStorm => "more than 60,000 exits of one vCPU within 3 s (20,000 a second)",
            VcpuEntryFailure => "KVM could not emulate an instruction or enter the guest",
            SeccompViolation => "a bulkhead thread made a system call outside its filter",
            ManagementCrossTenant => {
                "a management request for a VM of another tenant (answered as if it did not exist)"
            }
            ManagementAdminOverride => {
                "an admin acting on a tenant's VM, with the reason they gave"
            }
            ManagementAuditRecovered => {
                "the audit log's last line was left unfinished (a full disk or a crash mid-write) and was set aside at start"
            }
            SnapshotCrossTenant => {
                "a tenant asked to start a VM from, or to see, a snapshot of another tenant (answered as if it did not exist)"
            }
        }
    }
}

/// Ports of devices bulkhead never emulates, by what a guest would expect there.
const LEGACY_PORTS: &[(u16, u16, &str)] = &[
    (0x0000, 0x000f, "isa-dma"),
    (0x00c0, 0x00df, "isa-dma"),
    (0x0170, 0x0177, "ide-secondary"),
    (0x01f0, 0x01f7, "ide-primary"),
    (0x0278, 0x027f, "parallel"),
    (0x0376, 0x0376, "ide-secondary"),
    (0x0378, 0x037f, "parallel"),
    (0x03b0, 0x03df, "vga"),
    (0x03f0, 0x03f7, "floppy"),
    (0x0cf8, 0x0cff, "pci-config"),
];

/// The legacy device a guest would expect at `port`, for ports of devices bulkhead never
/// emulates (what `legacy_device_probe` watches).
pub fn legacy_device(port: u16) -> Option<&'static str> {
    LEGACY_PORTS
        .iter()
        .find(|&&(lo, hi, _)| (lo..=hi).contains(&port))
        .map(|&(_, _, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_are_twenty_three_rules_with_distinct_names() {
        assert_eq!(Rule::COUNT, 23);
        let mut names: Vec<&str> = Rule::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 23);
    }

    #[test]
    fn every_violation_encodes_and_decodes_to_itself() {
        let mut n = 0;
        for v in Violation::all() {
            let (layer, reason) = v.encode();
            assert_eq!(Violation::decode(layer, reason), Some(v));
            n += 1;
        }
        assert_eq!(
            n,
            TransportViolation::COUNT + ChainViolation::COUNT + RequestViolation::COUNT
        );
        assert_eq!(Violation::decode(0, 0), None);
        assert_eq!(Violation::decode(1, 200), None);
        assert_eq!(Violation::decode(4, 0), None);
    }

    #[test]
    fn only_host_failures_raise_no_alert() {
        let silent: Vec<Violation> = Violation::all().filter(|v| v.rule().is_none()).collect();
        assert_eq!(silent, vec![Violation::Request(RequestViolation::HostIo)]);
    }

    #[test]
    fn every_rule_but_the_host_side_ones_has_a_guest_trigger_or_a_vcpu_source() {
        // Rules fed by device refusals.
        let from_refusals: std::collections::HashSet<Rule> =
            Violation::all().filter_map(Violation::rule).collect();
        for rule in Rule::ALL {
            let other_source = matches!(
                rule,
                Rule::LegacyDeviceProbe
                    | Rule::PioScan
                    | Rule::MmioScan
                    | Rule::MsrProbe
                    | Rule::TripleFault
                    | Rule::ExitStorm
                    | Rule::VcpuEntryFailure
                    | Rule::SeccompViolation
                    // Raised by the management daemon, not by a VM.
                    | Rule::ManagementCrossTenant
                    | Rule::ManagementAdminOverride
                    | Rule::ManagementAuditRecovered
                    | Rule::SnapshotCrossTenant
            );
            assert!(
                from_refusals.contains(rule) != other_source,
                "{rule} has no source, or two"
            );
        }
    }

    #[test]
    fn priorities_order_from_emergency_to_debug() {
        assert!(Priority::Critical.at_least(Priority::Warning));
        assert!(Priority::Warning.at_least(Priority::Warning));
        assert!(!Priority::Notice.at_least(Priority::Warning));
        assert_eq!(Rule::SeccompViolation.priority(), Priority::Critical);
        assert_eq!(Rule::PioScan.priority(), Priority::Notice);
    }
}
