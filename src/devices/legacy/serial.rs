//! The 16550A UART at 0x3f8 (vm-superio), wired to the console and to IRQ 4 by irqfd.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::ByteRegisters;
use crate::warn_limited;

/// Raises an interrupt by writing an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

type Uart = Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// IER: the transmitter-empty interrupt is enabled.
const IER_THR_EMPTY: u8 = 0b0000_0010;
/// MCR: loopback, the transmitter feeds the receiver.
const MCR_LOOP: u8 = 0b0001_0000;
/// The registers whose writes can change what a data register write does: IER (or the
/// divisor's high byte), LCR (which of the two offset 1 is) and MCR.
const MODE_OFFSETS: [u8; 3] = [1, 3, 4];

/// A serial port whose output goes to `out`.
pub struct SerialPort {
    uart: Mutex<Uart>,
    /// A data register write only hands a byte to the console: no transmit interrupt, no
    /// loopback. KVM may then hold such writes back in its ring (`vstate::coalesced`).
    quiet_tx: Arc<AtomicBool>,
}

/// Whether a UART in `state` does nothing with a written byte but send it.
fn quiet(interrupt_enable: u8, modem_control: u8) -> bool {
    interrupt_enable & IER_THR_EMPTY == 0 && modem_control & MCR_LOOP == 0
}

/// The UART's registers and receive FIFO, as a snapshot keeps them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialPort {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialPort {
        let uart = Serial::new(EventFdTrigger(irq), out);
        let state = uart.state();
        SerialPort {
            quiet_tx: Arc::new(AtomicBool::new(quiet(
                state.interrupt_enable,
                state.modem_control,
            ))),
            uart: Mutex::new(uart),
        }
    }

    /// A UART in a saved state; None when vm-superio refuses it (a receive FIFO beyond its
    /// capacity).
    pub fn restored(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        saved: &SerialRegs,
    ) -> Option<SerialPort> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, EventFdTrigger(irq), NoEvents, out).ok()?;
        Some(SerialPort {
            quiet_tx: Arc::new(AtomicBool::new(quiet(
                saved.interrupt_enable,
                saved.modem_control,
            ))),
            uart: Mutex::new(uart),
        })
    }

    /// Set while a data register write has no effect but the byte sent (see `quiet_tx`).
    pub fn quiet_tx(&self) -> Arc<AtomicBool> {
        self.quiet_tx.clone()
    }

    pub fn save(&self) -> SerialRegs {
        let s = self.uart.lock().unwrap_or_else(|e| e.into_inner()).state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queues console input for the guest. Returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let room = uart.fifo_capacity();
        let take = bytes.len().min(room);
        if take == 0 {
            return 0;
        }
        match bytes.get(..take).map(|b| uart.enqueue_raw_bytes(b)) {
            Some(Ok(n)) => n,
            _ => 0,
        }
    }

    /// Writes out anything the console writer buffered.
    pub fn flush(&self) {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let _ = uart.writer_mut().flush();
    }
}

impl ByteRegisters for SerialPort {
    fn read_byte(&self, offset: u8) -> u8 {
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset)
    }

    fn write_byte(&self, offset: u8, value: u8) -> bool {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let result = uart.write(offset, value);
        if MODE_OFFSETS.contains(&offset) {
            let state = uart.state();
            // SeqCst: paired with the zone's own flag (`vstate::coalesced`).
            self.quiet_tx.store(
                quiet(state.interrupt_enable, state.modem_control),
                Ordering::SeqCst,
            );
        }
        drop(uart);
        if let Err(e) = result {
            // The console sink failing (a closed pipe, a full disk) must not stop the guest.
            warn_limited!("serial console write failed: {e:?}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex as StdMutex};

    use super::*;
    use crate::devices::BusDevice;

    #[derive(Clone, Default)]
    struct Sink(Arc<StdMutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_the_data_register_reach_the_console() {
        let sink = Sink::default();
        let port = SerialPort::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            assert!(port.write(0, &[*b]));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn wide_accesses_are_refused() {
        let port = SerialPort::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        assert!(!port.write(0, &[1, 2]));
        let mut two = [0u8; 2];
        assert!(!port.read(5, &mut two));
    }

    #[test]
    fn console_input_becomes_readable_with_data_ready_set() {
        let port = SerialPort::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        assert_eq!(port.enqueue_input(b"ab"), 2);
        let mut lsr = [0u8];
        assert!(port.read(5, &mut lsr));
        assert_eq!(lsr[0] & 1, 1);
        let mut rbr = [0u8];
        assert!(port.read(0, &mut rbr));
        assert_eq!(rbr[0], b'a');
    }

    #[test]
    fn data_writes_are_quiet_only_without_transmit_interrupts_or_loopback() {
        let port = SerialPort::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        let quiet = port.quiet_tx();
        let is_quiet = || quiet.load(Ordering::Acquire);
        assert!(
            is_quiet(),
            "a reset UART raises no interrupt for a sent byte"
        );
        assert!(port.write(1, &[IER_THR_EMPTY]));
        assert!(!is_quiet(), "the transmit interrupt is on");
        assert!(port.write(1, &[0x01]));
        assert!(is_quiet(), "only the receive interrupt is on");
        assert!(port.write(4, &[MCR_LOOP]));
        assert!(!is_quiet(), "loopback feeds the byte to the receiver");
        assert!(port.write(4, &[0x08]));
        assert!(is_quiet());
        // With DLAB set, offset 1 is the divisor's high byte, not IER.
        assert!(port.write(3, &[0x80]));
        assert!(port.write(1, &[IER_THR_EMPTY]));
        assert!(is_quiet(), "a divisor write is not an interrupt enable");
        assert!(port.write(3, &[0x03]));
        assert!(port.write(1, &[IER_THR_EMPTY]));
        assert!(!is_quiet());
        // A restored UART starts as its saved registers say.
        let saved = port.save();
        let restored =
            SerialPort::restored(EventFd::new(0).unwrap(), Box::new(std::io::sink()), &saved)
                .unwrap();
        assert!(!restored.quiet_tx().load(Ordering::Acquire));
    }
}
