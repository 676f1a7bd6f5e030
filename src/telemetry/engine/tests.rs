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
    e.observe(raw, now, None)
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
fn probes_during_boot_are_ignored_and_after_it_alerted() {
    let mut e = engine();
    let probe = |t| unassigned_read(0x3f4, t);
    assert!(obs(&mut e, &probe(START + S), START + S).is_empty());
    e.set_boot_complete(Some(START + 2 * S));
    assert!(
        obs(&mut e, &probe(START + S), START + 3 * S).is_empty(),
        "sent before boot completed"
    );
    let f = obs(&mut e, &probe(START + 3 * S), START + 3 * S);
    assert_eq!(sent(&f), vec![Rule::LegacyDeviceProbe]);
    assert_eq!(field(&f[0], "legacy_device"), "floppy");
}

#[test]
fn the_grace_period_settles_a_guest_that_never_reports_boot_complete() {
    let mut e = engine();
    let t = START + BOOT_GRACE_NS;
    let msr = Event::Msr {
        vcpu: 1,
        index: 0x1234_5678,
        write: false,
        value: 0,
    };
    assert!(obs(&mut e, &msr.encode(t - 1), t - 1).is_empty());
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
    e.set_boot_complete(Some(START));
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
    e.set_boot_complete(Some(START));
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
fn a_vcpu_exiting_fast_for_a_second_after_boot_is_an_exit_storm() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    e.set_boot_complete(Some(START));
    let row = region.vcpu(1).unwrap();
    let mut fired = Vec::new();
    for step in 0..9u64 {
        for _ in 0..(EXIT_STORM_PER_SEC / 2) {
            row.count(ExitKind::IoIn);
        }
        fired.extend(e.tick(&region, START + step * S / 4, false));
    }
    assert_eq!(sent(&fired), vec![Rule::ExitStorm]);
    assert_eq!(field(&fired[0], "vcpu"), 1);
    // The quiet vCPU 0 and a slow rate raise nothing.
    let mut e = engine();
    e.set_boot_complete(Some(START));
    let region = Region::anonymous().unwrap();
    for step in 0..9u64 {
        for _ in 0..1000 {
            region.vcpu(0).unwrap().count(ExitKind::IoOut);
        }
        assert!(e.tick(&region, START + step * S / 4, false).is_empty());
    }
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
fn a_probe_right_after_the_boot_report_is_judged_by_it() {
    let mut e = engine();
    let raw = unassigned_read(0x1f7, START + 2 * S);
    // The drain had not seen the report yet; the event carries it along.
    let f = e.observe(&raw, START + 2 * S, Some(START + S));
    assert_eq!(sent(&f), vec![Rule::LegacyDeviceProbe]);
}

#[test]
fn msr_probes_whose_events_were_lost_still_raise_msr_probe_once_settled() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    e.set_boot_complete(Some(START));
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
fn msr_probes_counted_before_the_boot_settled_are_not_alerted_later() {
    let region = Region::anonymous().unwrap();
    let mut e = engine();
    region.count(VmCounter::MsrFilteredReads);
    // Read while booting, judged a tick after the boot report.
    assert!(e.tick(&region, START + S, false).is_empty());
    e.set_boot_complete(Some(START + S + 1));
    assert!(e.tick(&region, START + S + S / 4, false).is_empty());
    assert!(e.close(&region, START + S + S / 2).is_empty());
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
