//! The i8042 and the UART's registers under any sequence of byte reads and writes.
//! Invariants: the i8042 asks for a reset only after a reset command on its command port (a
//! pulse of the reset line, 0xf0-0xfe even, or 0xd1 to write the output port); what the UART
//! prints is only bytes the guest wrote, in order.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use bulkhead::devices::legacy::i8042::I8042;
use bulkhead::devices::legacy::serial::SerialPort;
use bulkhead::devices::legacy::ByteRegisters;
use bulkhead::exit::ExitSignal;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let evt = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let exit = Arc::new(ExitSignal::new().expect("exit signal"));
    let i8042 = I8042::new(evt(), exit.clone());
    let sink = Sink::default();
    let serial = SerialPort::new(evt(), Box::new(sink.clone()));
    let mut reset_written = false;
    let mut data_written: Vec<u8> = Vec::new();
    // Each operation: target and direction, the register offset, a value.
    for op in data.chunks(3) {
        let [k, offset, value] = op else {
            break;
        };
        let serial_side = k & 2 != 0;
        let offset = if serial_side { offset % 8 } else { *offset };
        match (serial_side, k & 1 != 0) {
            (false, false) => {
                let _ = i8042.read_byte(offset);
            }
            (false, true) => {
                let pulse = *value >= 0xf0 && *value & 1 == 0;
                reset_written |= offset == 4 && (pulse || *value == 0xd1);
                let _ = i8042.write_byte(offset, *value);
            }
            (true, false) => {
                let _ = serial.read_byte(offset);
            }
            (true, true) => {
                data_written.push(*value);
                let _ = serial.write_byte(offset, *value);
            }
        }
        if exit.is_stopping() {
            assert!(reset_written, "the i8042 reset the machine unasked");
        }
    }
    serial.flush();
    let printed = sink.0.lock().unwrap().clone();
    // Every printed byte was written by the guest, in order (a subsequence).
    let mut written = data_written.iter();
    for b in &printed {
        assert!(
            written.any(|w| w == b),
            "the UART printed a byte the guest never wrote"
        );
    }
});
