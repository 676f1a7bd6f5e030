use super::*;

fn bytes_of(state: &VmState) -> Vec<u8> {
    encode(state, SnapshotKind::Full).unwrap()
}

fn sample() -> VmState {
    VmState {
        machine: "{\"vcpus\":1}".to_string(),
        mem_bytes: 64 << 20,
        vm: VmArchState {
            clock: Default::default(),
            irqchip: None,
        },
        vcpus: Vec::new(),
        devices: DevicesState {
            serial: SerialRegs {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![1, 2],
            },
            i8042: I8042State {
                ctr: 0x45,
                output_port: 3,
                output: vec![],
                pending: 0,
                last_was_command: false,
            },
            ioapic: None,
            virtio: Vec::new(),
        },
    }
}

#[test]
fn a_state_file_decodes_to_what_was_encoded() {
    let bytes = bytes_of(&sample());
    assert_eq!(&bytes[..8], b"BLKHSNAP");
    let back = decode(&bytes).unwrap();
    assert_eq!(back.machine, "{\"vcpus\":1}");
    assert_eq!(back.mem_bytes, 64 << 20);
    assert_eq!(back.devices.serial.in_buffer, vec![1, 2]);
}

#[test]
fn a_flipped_byte_anywhere_in_the_body_is_refused_by_the_crc() {
    let bytes = bytes_of(&sample());
    for at in HEADER_LEN..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        assert!(
            matches!(decode(&bad), Err(SnapshotError::Crc { .. })),
            "byte {at}"
        );
    }
}

#[test]
fn another_version_a_wrong_magic_or_a_cut_file_is_refused_with_what_was_wrong() {
    let bytes = bytes_of(&sample());
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(matches!(
        decode(&v2),
        Err(SnapshotError::Version { found: 2 })
    ));
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert!(matches!(decode(&magic), Err(SnapshotError::Magic(_))));
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1]),
        Err(SnapshotError::Length { .. })
    ));
    assert!(matches!(
        decode(&bytes[..10]),
        Err(SnapshotError::TooShort(10))
    ));
    let mut kind = bytes.clone();
    kind[12] = 2;
    assert!(matches!(decode(&kind), Err(SnapshotError::Kind(2))));
}

#[test]
fn a_diff_state_file_says_so_in_its_header_and_decodes_alike() {
    let diff = encode(&sample(), SnapshotKind::Diff).unwrap();
    assert_eq!(u32_at(&diff, 12), 1);
    assert_eq!(u32_at(&bytes_of(&sample()), 12), 0);
    assert_eq!(decode(&diff).unwrap().mem_bytes, 64 << 20);
}
