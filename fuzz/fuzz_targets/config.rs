//! The operator's side: the JSON settings file and every flag value with a parser of its own
//! (--disk, --net, --vsock, --console, --irqchip, --rng-limit). Invariants: a settings file
//! that validates respects the limits (vCPUs, memory, command line, unique disk ids and
//! paths, unique taps and MACs, a vsock CID above 2); parsing never panics.
#![no_main]

use bulkhead::config::{ConsoleConfig, IrqChip, RateLimiterConfig, RawDisk, RawNet, RawVsock};
use bulkhead::{RawConfig, VmConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<RawDisk>();
    let _ = text.parse::<RawNet>();
    let _ = text.parse::<RawVsock>();
    let _ = text.parse::<ConsoleConfig>();
    let _ = text.parse::<IrqChip>();
    let _ = text.parse::<RateLimiterConfig>();
    let Ok(raw) = RawConfig::from_json(text) else {
        return;
    };
    // Defaults fill what the file leaves out, as `bulkhead run --config` does.
    let raw = RawConfig {
        kernel: raw.kernel.clone().or_else(|| Some("/vmlinux".into())),
        ..raw
    };
    let Ok(config) = VmConfig::from_raw(raw, 4096) else {
        return;
    };
    assert!((1..=255).contains(&config.vm.vcpus), "{} vCPUs", config.vm.vcpus);
    assert!(config.vm.mem_mib <= 4096, "{} MiB", config.vm.mem_mib);
    assert!(!config.vm.cmdline.contains('\0'));
    for (i, d) in config.vm.disks.iter().enumerate() {
        assert!(config.vm.disks[..i]
            .iter()
            .all(|o| o.id != d.id && o.path != d.path));
    }
    for (i, n) in config.vm.nets.iter().enumerate() {
        assert!(config.vm.nets[..i]
            .iter()
            .all(|o| o.tap != n.tap && o.mac != n.mac));
        assert!(n.mac[0] & 1 == 0, "a multicast MAC");
    }
    if let Some(v) = &config.vm.vsock {
        assert!(v.cid > 2 && v.cid < u64::from(u32::MAX));
    }
});
