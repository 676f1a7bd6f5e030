//! Every metric family and label bulkhead exposes, named once. The exposition, the typed reader
//! of a metrics file and every front end that reads one (the daemon, the Firecracker
//! personality) use these, so a misspelt name does not compile.

/// A metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    VcpuExits,
    CoalescedPioWrites,
    UnhandledPio,
    UnhandledMmio,
    MsrFiltered,
    RefusedAccesses,
    VcpuFailures,
    VmmPanics,
    GuestPanics,
    ConsoleDroppedBytes,
    TelemetryEventsDropped,
    TelemetryEventsInvalid,
    VirtioRequests,
    VirtioBytes,
    VirtioInterrupts,
    VirtioDropped,
    VirtioPolicyResets,
    VirtioYields,
    VirtioThrottled,
    VirtioViolations,
    Alerts,
    AlertsSuppressed,
    AlertDeliveries,
    GuestMemoryBytes,
    Vcpus,
    SeccompFilteredThreads,
    VmProcessThreads,
    VmRunning,
    VmExit,
    VmExitStatus,
    VmProcessPeakRssBytes,
    SupervisorPeakRssBytes,
    BootCompleteSeconds,
    VmStartTimeSeconds,
}

/// Counter or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Family {
    /// Every family, in exposition order.
    pub const ALL: &'static [Family] = &[
        Family::VcpuExits,
        Family::CoalescedPioWrites,
        Family::UnhandledPio,
        Family::UnhandledMmio,
        Family::MsrFiltered,
        Family::RefusedAccesses,
        Family::VcpuFailures,
        Family::VmmPanics,
        Family::GuestPanics,
        Family::ConsoleDroppedBytes,
        Family::TelemetryEventsDropped,
        Family::TelemetryEventsInvalid,
        Family::VirtioRequests,
        Family::VirtioBytes,
        Family::VirtioInterrupts,
        Family::VirtioDropped,
        Family::VirtioPolicyResets,
        Family::VirtioYields,
        Family::VirtioThrottled,
        Family::VirtioViolations,
        Family::Alerts,
        Family::AlertsSuppressed,
        Family::AlertDeliveries,
        Family::GuestMemoryBytes,
        Family::Vcpus,
        Family::SeccompFilteredThreads,
        Family::VmProcessThreads,
        Family::VmRunning,
        Family::VmExit,
        Family::VmExitStatus,
        Family::VmProcessPeakRssBytes,
        Family::SupervisorPeakRssBytes,
        Family::BootCompleteSeconds,
        Family::VmStartTimeSeconds,
    ];

    /// The family's name and help text.
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Family::VcpuExits => ("bulkhead_vcpu_exits", "vCPU exits to user space, by vCPU and reason"),
            Family::CoalescedPioWrites => ("bulkhead_coalesced_pio_writes", "writes to the UART's data register that KVM held back in its ring instead of exiting (while the UART raises no transmit interrupt and loops nothing back), each handled in order before the next exit, a kick or the VM's end"),
            Family::UnhandledPio => ("bulkhead_unhandled_pio", "port accesses no device claims (reads get all-ones, writes are dropped)"),
            Family::UnhandledMmio => ("bulkhead_unhandled_mmio", "MMIO accesses to addresses with neither RAM nor a device"),
            Family::MsrFiltered => ("bulkhead_msr_filtered", "MSR accesses outside the allow-list, answered with #GP"),
            Family::RefusedAccesses => ("bulkhead_refused_accesses", "register accesses a device refused (bad size, offset or command)"),
            Family::VcpuFailures => ("bulkhead_vcpu_failures", "abnormal vCPU exits: triple fault, internal error, failed entry, a panicked vCPU thread"),
            Family::VmmPanics => ("bulkhead_vmm_panics", "panics in the VM process's own code, on any thread"),
            Family::GuestPanics => ("bulkhead_guest_panics", "guest kernel panics the pvpanic device reported, by what the kernel did next"),
            Family::ConsoleDroppedBytes => ("bulkhead_console_dropped_bytes", "console output bytes dropped past the console limit"),
            Family::TelemetryEventsDropped => ("bulkhead_telemetry_events_dropped", "telemetry events dropped because the channel to the supervisor was full"),
            Family::TelemetryEventsInvalid => ("bulkhead_telemetry_events_invalid", "telemetry events the supervisor rejected as naming nothing of this VM"),
            Family::VirtioRequests => ("bulkhead_virtio_requests", "requests (descriptor chains) a virtio device took, valid or not"),
            Family::VirtioBytes => ("bulkhead_virtio_bytes", "bytes a virtio device moved, by direction"),
            Family::VirtioInterrupts => ("bulkhead_virtio_interrupts", "interrupts a virtio device raised"),
            Family::VirtioDropped => ("bulkhead_virtio_dropped", "host-side data a virtio device dropped (no guest buffer, or the backend full)"),
            Family::VirtioPolicyResets => ("bulkhead_virtio_policy_resets", "times a virtio device was put in NEEDS_RESET in response to a violation"),
            Family::VirtioYields => ("bulkhead_virtio_yields", "times a virtio device used its work budget for one wakeup and let other events run first"),
            Family::VirtioThrottled => ("bulkhead_virtio_throttled", "times a rate limiter held a virtio queue back until its bucket refilled"),
            Family::VirtioViolations => ("bulkhead_virtio_violations", "guest requests a virtio device refused, by layer and reason"),
            Family::Alerts => ("bulkhead_alerts", "alerts sent, by rule and priority"),
            Family::AlertsSuppressed => ("bulkhead_alerts_suppressed", "rule firings the per-rule rate limit held back"),
            Family::AlertDeliveries => ("bulkhead_alert_deliveries", "alerts POSTed to --alerts-http, by outcome"),
            Family::GuestMemoryBytes => ("bulkhead_guest_memory_bytes", "guest RAM"),
            Family::Vcpus => ("bulkhead_vcpus", "vCPUs the VM has"),
            Family::SeccompFilteredThreads => ("bulkhead_seccomp_filtered_threads", "VM process threads running under a seccomp filter, as the kernel reports"),
            Family::VmProcessThreads => ("bulkhead_vm_process_threads", "threads of the VM process"),
            Family::VmRunning => ("bulkhead_vm_running", "1 while the VM process runs"),
            Family::VmExit => ("bulkhead_vm_exit", "why the VM ended: 1 for the reason"),
            Family::VmExitStatus => ("bulkhead_vm_exit_status", "the exit status of bulkhead run"),
            Family::VmProcessPeakRssBytes => ("bulkhead_vm_process_peak_rss_bytes", "the VM process's peak resident set"),
            Family::SupervisorPeakRssBytes => ("bulkhead_supervisor_peak_rss_bytes", "the supervisor's peak resident set"),
            Family::BootCompleteSeconds => ("bulkhead_boot_complete_seconds", "seconds from bulkhead run to the guest's boot-complete report"),
            Family::VmStartTimeSeconds => ("bulkhead_vm_start_time_seconds", "when bulkhead run started, in seconds since the Unix epoch"),
        }
    }

    /// The family's name without the `_total` a counter's samples carry.
    pub fn name(self) -> &'static str {
        self.describe().0
    }

    pub fn help(self) -> &'static str {
        self.describe().1
    }

    pub fn kind(self) -> Kind {
        match self {
            Family::VcpuExits
            | Family::CoalescedPioWrites
            | Family::UnhandledPio
            | Family::UnhandledMmio
            | Family::MsrFiltered
            | Family::RefusedAccesses
            | Family::VcpuFailures
            | Family::VmmPanics
            | Family::GuestPanics
            | Family::ConsoleDroppedBytes
            | Family::TelemetryEventsDropped
            | Family::TelemetryEventsInvalid
            | Family::VirtioRequests
            | Family::VirtioBytes
            | Family::VirtioInterrupts
            | Family::VirtioDropped
            | Family::VirtioPolicyResets
            | Family::VirtioYields
            | Family::VirtioThrottled
            | Family::VirtioViolations
            | Family::Alerts
            | Family::AlertsSuppressed
            | Family::AlertDeliveries => Kind::Counter,
            _ => Kind::Gauge,
        }
    }

    /// The name its samples carry: a counter's ends in `_total`.
    pub fn sample_name(self) -> String {
        match self.kind() {
            Kind::Counter => format!("{}_total", self.name()),
            Kind::Gauge => self.name().to_string(),
        }
    }

    /// The family whose samples carry `name`.
    pub fn of_sample(name: &str) -> Option<Family> {
        Family::ALL.iter().copied().find(|f| match f.kind() {
            Kind::Counter => name.strip_suffix("_total") == Some(f.name()),
            Kind::Gauge => name == f.name(),
        })
    }
}

/// A label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Label {
    VmId,
    Tenant,
    Vcpu,
    Reason,
    Direction,
    Device,
    Layer,
    Event,
    Rule,
    Priority,
    Outcome,
}

impl Label {
    pub const ALL: &'static [Label] = &[
        Label::VmId,
        Label::Tenant,
        Label::Vcpu,
        Label::Reason,
        Label::Direction,
        Label::Device,
        Label::Layer,
        Label::Event,
        Label::Rule,
        Label::Priority,
        Label::Outcome,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Label::VmId => "vm_id",
            Label::Tenant => "tenant",
            Label::Vcpu => "vcpu",
            Label::Reason => "reason",
            Label::Direction => "direction",
            Label::Device => "device",
            Label::Layer => "layer",
            Label::Event => "event",
            Label::Rule => "rule",
            Label::Priority => "priority",
            Label::Outcome => "outcome",
        }
    }

    pub fn of_name(name: &str) -> Option<Label> {
        Label::ALL.iter().copied().find(|l| l.name() == name)
    }
}

/// The `direction` of a virtio device's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteDirection {
    FromGuest,
    ToGuest,
}

impl ByteDirection {
    pub fn name(self) -> &'static str {
        match self {
            ByteDirection::FromGuest => "from_guest",
            ByteDirection::ToGuest => "to_guest",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_and_label_is_found_again_by_its_exposed_name() {
        for &f in Family::ALL {
            assert_eq!(Family::of_sample(&f.sample_name()), Some(f), "{f:?}");
        }
        for &l in Label::ALL {
            assert_eq!(Label::of_name(l.name()), Some(l));
        }
        assert_eq!(Family::of_sample("bulkhead_vcpu_exits"), None);
        assert_eq!(Family::of_sample("bulkhead_vm_exit_total"), None);
    }
}
