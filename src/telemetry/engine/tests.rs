//! Rule engine tests, with a private region standing in for the VM process.

use super::*;
use crate::telemetry::region::Region;
use crate::telemetry::vocabulary::{ChainViolation, ExitKind, ImageFormat, RequestViolation};

const S: u64 = 1_000_000_000;
const START: u64 = 100 * S;

fn engine() -> Engine {
    Engine::new(
        Limits {
            vcpus: 2,
            devices: 2,
        },
        vec!["virtio-blk0".into(), "virtio-rng0".into()],
        START,
    )
}

fn obs(e: &mut Engine, raw: &RawEvent, now: u64) -> Vec<Firing> {
    e.observe(raw, now)
}

fn sent(firings: &[Firing]) -> Vec<Rule> {
    firings
        .iter()
        .filter(|f| f.alert.is_some())
        .map(|f| f.rule)
        .collect()
}

fn field<'a>(f: &'a Firing, key: &str) -> &'a Value {
    &f.alert
        .as_ref()
        .unwrap()
        .fields
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap()
        .1
}

#[test]
fn a_refused_chain_raises_its_rule_with_the_evidence() {
    let mut e = engine();
    let raw = Event::Violation {
        device: 1,
        violation: ChainViolation::OutsideRam.into(),
        queue: Some(0),
        a: 0xc000_0000,
        b: 64,
    }
    .encode(START + 1);
    let f = obs(&mut e, &raw, START + 1);
    assert_eq!(sent(&f), vec![Rule::VirtioDescOutOfRam]);
    assert_eq!(field(&f[0], "device"), "virtio-rng0");
    assert_eq!(field(&f[0], "guest_address"), "0xc0000000");
    assert_eq!(field(&f[0], "queue"), 0);
    assert_eq!(e.sent(Rule::VirtioDescOutOfRam), 1);
}

#[test]
fn a_foreign_mac_and_an_image_header_are_named_in_the_evidence() {
    let mut e = engine();
    let spoof = Event::Violation {
        device: 0,
        violation: RequestViolation::ForeignSourceMac.into(),
        queue: Some(1),
        a: 0x0266_6666_6666,
        b: 60,
    };
    let f = obs(&mut e, &spoof.encode(START), START);
    assert_eq!(sent(&f), vec![Rule::NetMacSpoof]);
    assert_eq!(field(&f[0], "source_mac"), "02:66:66:66:66:66");
    let magic = Event::Violation {
        device: 0,
        violation: RequestViolation::ImageMagic.into(),
        queue: Some(0),
        a: ImageFormat::Qcow2.index() as u64,
        b: 512,
    };
    let f = obs(&mut e, &magic.encode(START), START);
    assert_eq!(sent(&f), vec![Rule::DiskImageMagicWrite]);
    assert_eq!(field(&f[0], "format"), "qcow2");
}

#[test]
fn a_legacy_port_probe_is_alerted_from_the_first_exit_without_any_boot_report() {
    let mut e = engine();
    let t = START + 1_000_000;
    let f = obs(&mut e, &unassigned_read(0x3f4, t), t);
    assert_eq!(sent(&f), vec![Rule::LegacyDeviceProbe]);
    assert_eq!(field(&f[0], "legacy_device"), "floppy");
}

#[test]
fn an_msr_probe_is_alerted_from_the_first_exit() {
    let mut e = engine();
    let msr = Event::Msr {
        vcpu: 1,
        index: 0x1234_5678,
        write: false,
        value: 0,
    };
    let t = START + 1;
    assert_eq!(sent(&obs(&mut e, &msr.encode(t), t)), vec![Rule::MsrProbe]);
}

/// vCPU 0 reading one byte from an unassigned `port` at `t`.
fn unassigned_read(port: u16, t: u64) -> RawEvent {
    Event::UnassignedPio {
        vcpu: 0,
        port,
        size: 1,
        write: false,
    }
    .encode(t)
}

#[test]
fn sixteen_distinct_ports_in_a_second_are_a_scan_and_fifteen_are_not() {
    let mut e = engine();
    let mut fired = Vec::new();
    for (i, port) in (0x4000u16..0x4010).enumerate() {
        let t = START + i as u64 * 1_000_000;
        let raw = unassigned_read(port, t);
        fired.extend(obs(&mut e, &raw, t));
        if i < 14 {
            assert!(fired.is_empty(), "fired after {} ports", i + 1);
        }
    }
    assert_eq!(sent(&fired), vec![Rule::PioScan]);
    assert_eq!(field(&fired[0], "distinct"), 16);
    assert_eq!(field(&fired[0], "vcpus"), &json!([0]));
    // Slowly, one port every 100 ms: never 16 within a second.
    let mut e = engine();
    for (i, port) in (0x4000u16..0x4020).enumerate() {
        let t = START + i as u64 * 100_000_000;
        let raw = unassigned_read(port, t);
        assert!(obs(&mut e, &raw, t).is_empty());
    }
}

#[test]
fn a_rule_sends_a_burst_then_holds_back_and_reports_what_it_held() {
    let mut e = engine();
    let raw = Event::TripleFault { vcpu: 0 }.encode(START);
    let mut alerts = 0;
    for _ in 0..25 {
        alerts += sent(&obs(&mut e, &raw, START)).len();
    }
    assert_eq!(alerts, BUCKET_BURST as usize);
    assert_eq!(e.suppressed(Rule::TripleFault), 15);
    let later = obs(&mut e, &raw, START + 2 * S);
    assert_eq!(later[0].alert.as_ref().unwrap().suppressed, 15);
}

#[test]
fn refusals_whose_events_were_lost_still_raise_the_rule_a_tick_later() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    let slot = region.device(0).unwrap();
    // One refusal with its event, and three whose events the full channel dropped.
    for _ in 0..4 {
        slot.refuse(ChainViolation::Loop.into());
    }
    let raw = Event::Violation {
        device: 0,
        violation: ChainViolation::Loop.into(),
        queue: Some(0),
        a: 0,
        b: 8,
    }
    .encode(START);
    assert_eq!(sent(&obs(&mut e, &raw, START)), vec![Rule::VirtioBadChain]);
    assert!(
        e.tick(&region, START, false).is_empty(),
        "events may still be in flight"
    );
    let f = e.tick(&region, START + S / 4, false);
    assert_eq!(sent(&f), vec![Rule::VirtioBadChain]);
    assert_eq!(field(&f[0], "count"), 3);
    assert_eq!(field(&f[0], "evidence"), "lost");
    assert!(
        e.tick(&region, START + S / 2, false).is_empty(),
        "reported once"
    );
}

#[test]
fn an_event_arriving_after_its_counter_was_read_is_not_reported_as_lost() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    region
        .device(1)
        .unwrap()
        .refuse(ChainViolation::ZeroLength.into());
    assert!(e.tick(&region, START, false).is_empty());
    let raw = Event::Violation {
        device: 1,
        violation: ChainViolation::ZeroLength.into(),
        queue: None,
        a: 0,
        b: 0,
    }
    .encode(START);
    assert_eq!(sent(&obs(&mut e, &raw, START)), vec![Rule::VirtioBadChain]);
    assert!(e.tick(&region, START + S / 4, false).is_empty());
}

#[test]
fn a_vcpu_exiting_fast_from_its_start_is_an_exit_storm() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    let row = region.vcpu(1).unwrap();
    let mut fired = Vec::new();
    // 40,000 a second, in quarter seconds: past the window's 60,000 after 1.5 s.
    for step in 1..9u64 {
        for _ in 0..(EXIT_STORM_PER_SEC / 2) {
            row.count(ExitKind::IoIn);
        }
        fired.extend(e.tick(&region, START + step * S / 4, false));
    }
    assert_eq!(sent(&fired), vec![Rule::ExitStorm]);
    assert_eq!(field(&fired[0], "vcpu"), 1);
    // The quiet vCPU 0 and a slow rate raise nothing.
    let mut e = engine();
    let region = Region::anonymous().unwrap();
    for step in 1..40u64 {
        for _ in 0..4000 {
            region.vcpu(0).unwrap().count(ExitKind::IoOut);
        }
        assert!(e.tick(&region, START + step * S / 4, false).is_empty());
        assert!(e.close(&region, START + step * S / 4).is_empty());
    }
}

#[test]
fn more_exits_than_the_window_allows_before_the_window_is_over_are_a_storm() {
    let allowed = EXIT_STORM_PER_SEC * 3;
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    for _ in 0..=allowed {
        region.vcpu(0).unwrap().count(ExitKind::IoIn);
    }
    // The VM ended 500 ms after its start, before any tick looked.
    let f = e.close(&region, START + S / 2);
    assert_eq!(sent(&f), vec![Rule::ExitStorm]);
    assert_eq!(field(&f[0], "exits_per_second"), (allowed + 1) * 2);
    // As many as the window allows, and no more, are not: a verbose Linux boot makes about
    // half that in all.
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    for _ in 0..allowed {
        region.vcpu(0).unwrap().count(ExitKind::IoIn);
    }
    assert!(e.close(&region, START + S / 2).is_empty());
}

#[test]
fn firings_the_rate_limit_held_back_are_reported_when_the_vm_ends() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    let t = START + 1;
    let mut alerts = 0;
    for port in 0..(BUCKET_BURST as u16 + 5) {
        alerts += sent(&obs(&mut e, &unassigned_read(0x1f0 + port % 8, t), t)).len();
    }
    assert_eq!(alerts, BUCKET_BURST as usize);
    assert_eq!(e.suppressed(Rule::LegacyDeviceProbe), 5);
    let f = e.close(&region, t);
    assert_eq!(sent(&f), vec![Rule::LegacyDeviceProbe]);
    assert_eq!(field(&f[0], "held"), 5);
    assert_eq!(field(&f[0], "evidence"), "rate_limited");
    assert_eq!(f[0].alert.as_ref().unwrap().suppressed, 5);
}

#[test]
fn events_naming_nothing_of_this_vm_are_counted_and_ignored() {
    let mut e = engine();
    let raw = Event::TripleFault { vcpu: 7 }.encode(START);
    assert!(obs(&mut e, &raw, START).is_empty());
    let garbage = RawEvent {
        word: u64::MAX,
        ..Default::default()
    };
    assert!(obs(&mut e, &garbage, START).is_empty());
    assert_eq!(e.invalid_events(), 2);
}

#[test]
fn msr_probes_whose_events_were_lost_still_raise_msr_probe_a_tick_later() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    for _ in 0..5 {
        region.count(VmCounter::MsrFilteredReads);
    }
    assert!(e.tick(&region, START + S, false).is_empty());
    let f = e.tick(&region, START + S + S / 4, false);
    assert_eq!(sent(&f), vec![Rule::MsrProbe]);
    assert_eq!(field(&f[0], "count"), 5);
}

#[test]
fn a_lost_verdict_waits_while_the_ring_holds_events_but_not_forever() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    region
        .device(0)
        .unwrap()
        .refuse(ChainViolation::Loop.into());
    assert!(e.tick(&region, START, false).is_empty());
    // The drain keeps stopping short of the ring's end: the event may be there.
    for step in 1..=MAX_WAITS as u64 {
        assert!(e.tick(&region, START + step * S / 4, true).is_empty());
    }
    let f = e.tick(&region, START + (MAX_WAITS as u64 + 1) * S / 4, true);
    assert_eq!(sent(&f), vec![Rule::VirtioBadChain]);
    assert_eq!(field(&f[0], "evidence"), "lost");
}

#[test]
fn an_msr_probe_whose_event_was_lost_right_after_the_start_is_reported_at_the_close() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    region.count(VmCounter::MsrFilteredReads);
    let f = e.close(&region, START + 1);
    assert_eq!(sent(&f), vec![Rule::MsrProbe]);
    assert_eq!(field(&f[0], "evidence"), "lost");
}

#[test]
fn refusals_lost_just_before_the_end_are_reported_at_the_close() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    region
        .device(0)
        .unwrap()
        .refuse(ChainViolation::OutsideRam.into());
    let f = e.close(&region, START);
    assert_eq!(sent(&f), vec![Rule::VirtioDescOutOfRam]);
    assert_eq!(field(&f[0], "evidence"), "lost");
}

#[test]
fn ports_an_honest_boot_touches_are_not_probes_and_pci_configuration_only_within_its_budget() {
    let mut e = engine();
    let t = START + 1;
    // What Linux touched while booting (docs/detection.md): CMOS, the DMA page register, the
    // other COM ports, and bus 0's PCI configuration a few times.
    for port in [
        0x70, 0x71, 0x87, 0x2f9, 0x2e9, 0x3e9, 0xcf8, 0xcfc, 0xcf8, 0xcfc,
    ] {
        assert!(
            obs(&mut e, &unassigned_read(port, t), t).is_empty(),
            "{port:#x}"
        );
    }
    // A walk of the PCI bus outlasts the budget of 16, and every access past it is a probe.
    let mut fired = Vec::new();
    for _ in 0..16 {
        fired.extend(obs(&mut e, &unassigned_read(0xcfc, t), t));
    }
    assert_eq!(sent(&fired), vec![Rule::LegacyDeviceProbe; 4]);
    assert_eq!(field(&fired[0], "legacy_device"), "pci-config");
    // 17 distinct expected ports in a second are no scan.
    let mut e = engine();
    let mut fired = Vec::new();
    for port in (0x2e8..=0x2ef).chain(0x2f8..=0x2ff).chain([0x70]) {
        fired.extend(obs(&mut e, &unassigned_read(port, t), t));
    }
    assert!(fired.is_empty(), "{fired:?}");
}
