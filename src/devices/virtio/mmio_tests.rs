//! Unit tests of the virtio-mmio transport, driven the way a Linux driver drives it, and
//! with each request the transport must refuse.

use std::sync::Arc;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::ActivateError;
use crate::telemetry::{ChainViolation, DeviceCounter, OnViolation};

const FEATURE_X: u64 = 1 << 5;

#[derive(Default)]
struct Seen {
    activated: Option<(u64, Vec<Option<QueueConfig>>)>,
    resets: u32,
    config: [u8; 8],
}

struct MockDevice {
    seen: Arc<Mutex<Seen>>,
    fail_activation: bool,
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        4
    }
    fn features(&self) -> u64 {
        FEATURE_X
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 16]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        let seen = self.seen.lock().unwrap();
        let Some(src) = usize::try_from(offset)
            .ok()
            .and_then(|o| seen.config.get(o..o + data.len()))
        else {
            return false;
        };
        data.copy_from_slice(src);
        true
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        let mut seen = self.seen.lock().unwrap();
        let Some(dst) = usize::try_from(offset)
            .ok()
            .and_then(|o| seen.config.get_mut(o..o + data.len()))
        else {
            return false;
        };
        dst.copy_from_slice(data);
        true
    }
    fn activate(
        &mut self,
        features: u64,
        queues: &[Option<QueueConfig>],
    ) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::QueueNotReady(1));
        }
        self.seen.lock().unwrap().activated = Some((features, queues.to_vec()));
        Ok(())
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().resets += 1;
    }
}

/// RAM at 0..64 KiB and 4 GiB..4 GiB+64 KiB: the rings the tests use lie in it.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000_0000), 0x1_0000),
    ])
    .unwrap()
}

fn transport_with_shared(
    fail_activation: bool,
) -> (MmioTransport, Arc<Mutex<Seen>>, Arc<DeviceShared>) {
    transport_with_policy(fail_activation, OnViolation::Log)
}

/// A transport whose device responds to violations as `policy` says (tests of the protocol
/// itself use `log`, so one refusal does not change what the next request finds).
fn transport_with_policy(
    fail_activation: bool,
    policy: OnViolation,
) -> (MmioTransport, Arc<Mutex<Seen>>, Arc<DeviceShared>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let dev = MockDevice {
        seen: seen.clone(),
        fail_activation,
    };
    let shared = DeviceShared::detached("virtio-test0", policy).unwrap();
    (
        MmioTransport::new(Box::new(dev), shared.clone(), memory()),
        seen,
        shared,
    )
}

fn transport(fail_activation: bool) -> (MmioTransport, Arc<Mutex<Seen>>) {
    let (t, seen, _) = transport_with_shared(fail_activation);
    (t, seen)
}

fn r(t: &MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    assert!(t.read(u64::from(reg), &mut b), "read of {reg:#x} refused");
    u32::from_le_bytes(b)
}

fn w(t: &MmioTransport, reg: u32, value: u32) -> bool {
    t.write(u64::from(reg), &value.to_le_bytes())
}

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRV: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
const FOK: u32 = DRV | VIRTIO_CONFIG_S_FEATURES_OK;
const DOK: u32 = FOK | VIRTIO_CONFIG_S_DRIVER_OK;

/// Negotiates VERSION_1 and FEATURE_X, leaving the device at FEATURES_OK.
fn negotiate(t: &MmioTransport) {
    assert!(w(t, VIRTIO_MMIO_STATUS, ACK));
    assert!(w(t, VIRTIO_MMIO_STATUS, DRV));
    assert!(w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0));
    assert!(w(t, VIRTIO_MMIO_DRIVER_FEATURES, FEATURE_X as u32));
    assert!(w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1));
    assert!(w(
        t,
        VIRTIO_MMIO_DRIVER_FEATURES,
        1 << (VIRTIO_F_VERSION_1 - 32)
    ));
    assert!(w(t, VIRTIO_MMIO_STATUS, FOK));
    assert_eq!(r(t, VIRTIO_MMIO_STATUS), FOK);
}

fn setup_queue(t: &MmioTransport, index: u32, size: u32, desc: u64) -> bool {
    w(t, VIRTIO_MMIO_QUEUE_SEL, index)
        && w(t, VIRTIO_MMIO_QUEUE_NUM, size)
        && w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32)
        && w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32)
        && w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000)
        && w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0)
        && w(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000)
        && w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0)
        && w(t, VIRTIO_MMIO_QUEUE_READY, 1)
}

#[test]
fn identity_registers_describe_a_version_2_device() {
    let (t, _) = transport(false);
    assert_eq!(r(&t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
    assert_eq!(r(&t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&t, VIRTIO_MMIO_DEVICE_ID), 4);
    assert_eq!(r(&t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert!(w(&t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1));
    assert_eq!(
        r(&t, VIRTIO_MMIO_DEVICE_FEATURES),
        1 << (VIRTIO_F_VERSION_1 - 32)
    );
}

#[test]
fn a_well_behaved_driver_activates_the_device_with_its_queues() {
    let (t, seen, shared) = transport_with_shared(false);
    negotiate(&t);
    assert_eq!(r(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    assert!(setup_queue(&t, 0, 128, 0x1_0000_1000));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    assert_eq!(r(&t, VIRTIO_MMIO_STATUS), DOK);
    let (features, queues) = seen
        .lock()
        .unwrap()
        .activated
        .clone()
        .expect("not activated");
    assert_eq!(features, FEATURE_X | (1 << VIRTIO_F_VERSION_1));
    assert_eq!(
        queues,
        vec![
            Some(QueueConfig {
                size: 128,
                desc_table: 0x1_0000_1000,
                avail_ring: 0x2000,
                used_ring: 0x3000
            }),
            None
        ]
    );
    // The queue side now owns queue 0; queue 1 was never made ready.
    let active = shared.active();
    let activation = active.as_ref().expect("queue side not started");
    assert!(activation.queues[0].is_some() && activation.queues[1].is_none());
    assert_eq!(shared.state_evt().read().unwrap(), 1);
    drop(active);
    assert!(TransportViolation::ALL
        .iter()
        .all(|&v| t.violations(v) == 0));
}

#[test]
fn status_that_skips_a_step_is_refused_and_counted() {
    let (t, _) = transport(false);
    assert!(!w(&t, VIRTIO_MMIO_STATUS, DOK));
    assert!(w(&t, VIRTIO_MMIO_STATUS, ACK));
    assert!(!w(&t, VIRTIO_MMIO_STATUS, FOK));
    assert_eq!(r(&t, VIRTIO_MMIO_STATUS), ACK);
    assert_eq!(t.violations(TransportViolation::BadStatusTransition), 2);
}

#[test]
fn features_without_version_1_or_not_offered_fail_negotiation() {
    for acked in [FEATURE_X, FEATURE_X | (1 << 40) | (1 << VIRTIO_F_VERSION_1)] {
        let (t, _) = transport(false);
        w(&t, VIRTIO_MMIO_STATUS, ACK);
        w(&t, VIRTIO_MMIO_STATUS, DRV);
        w(&t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&t, VIRTIO_MMIO_DRIVER_FEATURES, acked as u32);
        w(&t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&t, VIRTIO_MMIO_DRIVER_FEATURES, (acked >> 32) as u32);
        assert!(!w(&t, VIRTIO_MMIO_STATUS, FOK));
        assert_eq!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert_eq!(t.violations(TransportViolation::BadFeatures), 1);
    }
}

#[test]
fn features_and_queues_are_read_only_outside_their_window() {
    let (t, _) = transport(false);
    // Queues before FEATURES_OK, features before DRIVER.
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_NUM, 16));
    assert!(!w(&t, VIRTIO_MMIO_DRIVER_FEATURES, 1));
    negotiate(&t);
    // Renegotiating after FEATURES_OK.
    assert!(!w(&t, VIRTIO_MMIO_DRIVER_FEATURES, 0));
    assert!(setup_queue(&t, 0, 16, 0x1000));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    // Selecting a queue is harmless at any time; rewriting a live queue is not.
    assert!(w(&t, VIRTIO_MMIO_QUEUE_SEL, 1));
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000));
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_NUM, 8));
    assert_eq!(t.violations(TransportViolation::QueueEarly), 1);
    assert_eq!(t.violations(TransportViolation::FeaturesEarly), 1);
    assert_eq!(t.violations(TransportViolation::FeaturesLocked), 1);
    assert_eq!(t.violations(TransportViolation::QueueLocked), 2);
}

#[test]
fn disabling_a_queue_of_a_reset_device_is_not_refused() {
    let (t, _) = transport(false);
    // Linux tears queues down this way after resetting a device.
    assert!(w(&t, VIRTIO_MMIO_QUEUE_SEL, 0));
    assert!(w(&t, VIRTIO_MMIO_QUEUE_READY, 0));
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_READY, 1));
    assert_eq!(t.violations(TransportViolation::QueueEarly), 1);
}

#[test]
fn by_default_a_violation_puts_the_device_in_needs_reset_and_log_does_not() {
    let (t, _, shared) = transport_with_policy(false, OnViolation::ResetDevice);
    negotiate(&t);
    assert!(setup_queue(&t, 0, 16, 0x1000));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_NUM, 8));
    assert_ne!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(shared.telemetry.get(DeviceCounter::PolicyResets), 1);
    let (t, _, shared) = transport_with_policy(false, OnViolation::Log);
    negotiate(&t);
    assert!(setup_queue(&t, 0, 16, 0x1000));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_NUM, 8));
    assert_eq!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(shared.telemetry.get(DeviceCounter::PolicyResets), 0);
}

#[test]
fn queue_sizes_above_the_maximum_zero_or_not_a_power_of_two_are_refused() {
    let (t, _) = transport(false);
    negotiate(&t);
    w(&t, VIRTIO_MMIO_QUEUE_SEL, 1);
    // Queue 1 allows 16: too big, zero, and (below the maximum) not a power of two.
    for bad in [0, 3, 12, 17, 32, 0x1_0000] {
        assert!(!w(&t, VIRTIO_MMIO_QUEUE_NUM, bad), "size {bad} accepted");
    }
    assert!(w(&t, VIRTIO_MMIO_QUEUE_NUM, 16));
    assert!(w(&t, VIRTIO_MMIO_QUEUE_NUM, 4));
    assert_eq!(t.violations(TransportViolation::BadQueueSize), 6);
}

#[test]
fn a_queue_with_misaligned_rings_or_no_size_can_not_be_made_ready() {
    let (t, _) = transport(false);
    negotiate(&t);
    assert!(!setup_queue(&t, 0, 16, 0x1008));
    w(&t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_READY, 1));
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_READY, 2));
    assert_eq!(t.violations(TransportViolation::MisalignedRing), 1);
    assert_eq!(t.violations(TransportViolation::BadQueueSetup), 2);
    assert_eq!(r(&t, VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn a_ready_queue_keeps_its_layout() {
    let (t, _) = transport(false);
    negotiate(&t);
    assert!(setup_queue(&t, 0, 16, 0x1000));
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_NUM, 32));
    assert_eq!(t.violations(TransportViolation::QueueLocked), 1);
}

#[test]
fn selecting_or_notifying_a_queue_that_does_not_exist_is_refused() {
    let (t, _) = transport(false);
    negotiate(&t);
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_SEL, 2));
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_NOTIFY, 7));
    assert!(w(&t, VIRTIO_MMIO_QUEUE_NOTIFY, 1));
    assert_eq!(t.violations(TransportViolation::NoSuchQueue), 2);
}

#[test]
fn config_writes_before_driver_ok_are_refused_and_later_ones_bump_the_generation() {
    let (t, seen) = transport(false);
    assert!(!t.write(CONFIG_START, &[1, 2]));
    negotiate(&t);
    assert!(!t.write(CONFIG_START, &[1, 2]));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    let generation = r(&t, VIRTIO_MMIO_CONFIG_GENERATION);
    assert!(t.write(CONFIG_START + 2, &[7, 8]));
    assert_eq!(r(&t, VIRTIO_MMIO_CONFIG_GENERATION), generation + 1);
    assert_eq!(&seen.lock().unwrap().config[2..4], &[7, 8]);
    assert!(
        !t.write(CONFIG_START + 7, &[1, 2]),
        "write past the config space accepted"
    );
    assert_eq!(t.violations(TransportViolation::ConfigWriteRefused), 3);
    let mut b = [0u8; 2];
    assert!(t.read(CONFIG_START + 2, &mut b));
    assert_eq!(b, [7, 8]);
}

#[test]
fn control_register_accesses_must_be_32_bit_and_aligned() {
    let (t, _) = transport(false);
    let mut two = [0u8; 2];
    assert!(!t.read(0, &mut two));
    assert_eq!(two, [0, 0]);
    assert!(!t.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]));
    assert!(!t.write(u64::from(VIRTIO_MMIO_STATUS), &[1]));
    assert_eq!(t.violations(TransportViolation::BadAccess), 3);
    assert_eq!(r(&t, VIRTIO_MMIO_STATUS), 0);
}

#[test]
fn writing_a_read_only_register_or_reading_a_write_only_one_is_refused() {
    let (t, _) = transport(false);
    assert!(!w(&t, VIRTIO_MMIO_MAGIC_VALUE, 0));
    let mut b = [0u8; 4];
    assert!(!t.read(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &mut b));
    assert_eq!(t.violations(TransportViolation::WrongDirection), 2);
}

#[test]
fn writing_zero_to_status_resets_device_and_queues() {
    let (t, seen, shared) = transport_with_shared(false);
    negotiate(&t);
    assert!(setup_queue(&t, 0, 16, 0x1000));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    assert!(shared.active().is_some());
    shared.set_needs_reset();
    assert_ne!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(w(&t, VIRTIO_MMIO_STATUS, 0));
    assert_eq!(r(&t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(r(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert!(
        shared.active().is_none(),
        "the queue side still holds the rings"
    );
    assert_eq!(seen.lock().unwrap().resets, 1);
    negotiate(&t);
    assert_eq!(r(&t, VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn a_queue_whose_rings_are_not_in_guest_ram_can_not_be_made_ready() {
    let (t, _, shared) = transport_with_shared(false);
    negotiate(&t);
    // The descriptor table would sit in the hole between the two RAM regions.
    assert!(!setup_queue(&t, 0, 16, 0x8000_0000));
    // Straddling the end of the first region is refused too.
    assert!(!setup_queue(&t, 0, 16, 0xff80));
    assert_eq!(shared.telemetry.refusals(ChainViolation::RingOutsideRam), 2);
    assert_eq!(r(&t, VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn a_driver_echoing_needs_reset_in_a_status_write_is_not_refused() {
    let (t, _, shared) = transport_with_shared(false);
    w(&t, VIRTIO_MMIO_STATUS, ACK);
    shared.set_needs_reset();
    assert!(w(&t, VIRTIO_MMIO_STATUS, DRV | VIRTIO_CONFIG_S_NEEDS_RESET));
    assert_eq!(r(&t, VIRTIO_MMIO_STATUS), DRV | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(t.violations(TransportViolation::BadStatusTransition), 0);
}

#[test]
fn driver_ok_without_a_needed_queue_is_counted_and_marks_the_device_as_needing_reset() {
    let (t, seen) = transport(true);
    negotiate(&t);
    assert!(setup_queue(&t, 0, 16, 0x1000));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    assert_ne!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(seen.lock().unwrap().activated.is_none());
    // The driver's fault, counted like any refusal.
    assert_eq!(t.violations(TransportViolation::QueueNotReady), 1);
}

#[test]
fn notifications_that_exit_to_user_space_reach_their_queues_eventfd_and_no_other() {
    let (t, _, _) = transport_with_shared(false);
    let evts: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let t = t.notify_by(evts.iter().map(|e| e.try_clone().unwrap()).collect());
    assert!(w(&t, VIRTIO_MMIO_QUEUE_NOTIFY, 1));
    assert!(w(&t, VIRTIO_MMIO_QUEUE_NOTIFY, 1));
    assert_eq!(evts[1].read().unwrap(), 2);
    assert!(evts[0].read().is_err(), "queue 0 was signalled");
    // A queue that does not exist is refused and signals nothing.
    assert!(!w(&t, VIRTIO_MMIO_QUEUE_NOTIFY, 2));
    assert!(evts.iter().all(|e| e.read().is_err()));
}

/// A live device with queue 0 at a position of its own: what a snapshot finds.
fn live_device() -> (MmioTransport, Arc<DeviceShared>) {
    let (t, _, shared) = transport_with_shared(false);
    negotiate(&t);
    assert!(setup_queue(&t, 0, 128, 0x1_0000_1000));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    if let Some(a) = shared.active().as_mut() {
        a.queues[0].as_mut().unwrap().set_position(7, 5);
    }
    (t, shared)
}

#[test]
fn a_saved_live_device_is_restored_live_at_its_ring_positions_less_the_chains_it_held() {
    let (t, _) = live_device();
    let saved = t.save(|q| if q == 0 { 2 } else { 0 });
    assert_eq!(
        saved.rings,
        Some(vec![
            Some(RingPosition {
                next_avail: 5,
                next_used: 5
            }),
            None
        ])
    );
    let (fresh, seen, shared) = transport_with_shared(false);
    fresh.restore(&saved).unwrap();
    assert_eq!(r(&fresh, VIRTIO_MMIO_STATUS), DOK);
    assert!(seen.lock().unwrap().activated.is_some());
    let active = shared.active();
    let queue = active.as_ref().unwrap().queues[0].as_ref().unwrap();
    assert_eq!(queue.position(), (5, 5));
    drop(active);
    // Restored once more, it saves the same again.
    assert_eq!(fresh.save(|_| 0), saved);
}

#[test]
fn what_a_guest_can_leave_behind_restores_features_written_early_and_a_failed_start() {
    // Features no device offers, written before FEATURES_OK: the transport kept them (it
    // checks them at FEATURES_OK), and a snapshot must too.
    let (t, _) = transport(false);
    assert!(w(&t, VIRTIO_MMIO_STATUS, ACK));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DRV));
    assert!(w(&t, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff));
    let (fresh, _) = transport(false);
    fresh.restore(&t.save(|_| 0)).unwrap();
    assert_eq!(r(&fresh, VIRTIO_MMIO_STATUS), DRV);
    // DRIVER_OK taken, the device's start refused: NEEDS_RESET, no queues.
    let (t, _) = transport(true);
    negotiate(&t);
    assert!(setup_queue(&t, 0, 128, 0x1_0000_1000));
    assert!(w(&t, VIRTIO_MMIO_STATUS, DOK));
    let saved = t.save(|_| 0);
    assert!(saved.needs_reset && saved.rings.is_none());
    let (fresh, seen, shared) = transport_with_shared(false);
    fresh.restore(&saved).unwrap();
    assert!(shared.needs_reset() && shared.active().is_none());
    assert!(seen.lock().unwrap().activated.is_none());
}

#[test]
fn a_crafted_transport_state_is_refused_and_changes_nothing() {
    let (t, _) = live_device();
    let good = t.save(|_| 0);
    let mut cases = Vec::new();
    let mut bad = good.clone();
    bad.device_type = 1;
    cases.push(bad);
    let mut bad = good.clone();
    bad.queues.pop();
    cases.push(bad);
    let mut bad = good.clone();
    bad.status = DOK & !VIRTIO_CONFIG_S_DRIVER;
    cases.push(bad);
    let mut bad = good.clone();
    bad.driver_features |= 1 << 40;
    cases.push(bad);
    let mut bad = good.clone();
    bad.queues[0].desc_table = 0x1_0000_1004;
    cases.push(bad);
    let mut bad = good.clone();
    bad.queues[0].used_ring = 0x8000_0000;
    cases.push(bad);
    let mut bad = good.clone();
    bad.queues[0].size = 512;
    cases.push(bad);
    let mut bad = good.clone();
    bad.rings = None;
    cases.push(bad);
    let mut bad = good.clone();
    bad.rings = Some(vec![None, None]);
    cases.push(bad);
    for (i, bad) in cases.iter().enumerate() {
        let (fresh, _, shared) = transport_with_shared(false);
        assert!(fresh.restore(bad).is_err(), "case {i} was taken");
        assert_eq!(r(&fresh, VIRTIO_MMIO_STATUS), 0, "case {i}");
        assert!(shared.active().is_none(), "case {i}");
    }
}
