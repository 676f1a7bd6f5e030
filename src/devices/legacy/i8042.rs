//! The i8042 keyboard controller: enough of it that a guest's probe finds a controller with a
//! keyboard and no mouse at once (instead of timing out for seconds), and that its reset
//! lines end the VM.
//!
//! Port 0x60 is data, port 0x64 is status (read) and command (write). Replies queue in a small
//! bounded output buffer; with the keyboard interrupt enabled each reply raises IRQ 1.
//! Commands bulkhead does not implement are refused, and so counted, never guessed at.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::ByteRegisters;
use crate::exit::{ExitSignal, ResetVia, VmExitReason};
use crate::warn_limited;

const DATA: u8 = 0;
const COMMAND: u8 = 4;

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
/// Set when the keyboard is not inhibited by a keylock; a guest that finds it clear warns.
const STATUS_NOT_INHIBITED: u8 = 1 << 4;

const CTR_KBD_INT: u8 = 1 << 0;
const CTR_SYSTEM: u8 = 1 << 2;
const CTR_KBD_DISABLE: u8 = 1 << 4;
const CTR_AUX_DISABLE: u8 = 1 << 5;
const CTR_TRANSLATE: u8 = 1 << 6;
/// What firmware leaves behind: keyboard interrupt on, system flag, scancode translation.
const CTR_DEFAULT: u8 = CTR_KBD_INT | CTR_SYSTEM | CTR_TRANSLATE;

/// Output port bit 0 low holds the CPU in reset.
const OUTPUT_PORT_RESET_RELEASED: u8 = 1 << 0;
const OUTPUT_PORT_A20: u8 = 1 << 1;

const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// Replies waiting for the guest. A guest can not make this grow: each command adds at most
/// three bytes and anything beyond the limit is dropped, as a real controller would.
const OUTPUT_LIMIT: usize = 16;

/// A controller command that takes the next byte written to the data port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    WriteCtr,
    WriteOutputPort,
    WriteKbdOutput,
    WriteAuxOutput,
    WriteToAux,
    /// A keyboard command (set LEDs, typematic, scancode set) waiting for its argument.
    KbdArgument,
}

#[derive(Debug)]
struct State {
    ctr: u8,
    output_port: u8,
    output: VecDeque<u8>,
    pending: Pending,
    last_was_command: bool,
}

impl Pending {
    fn code(self) -> u8 {
        match self {
            Pending::None => 0,
            Pending::WriteCtr => 1,
            Pending::WriteOutputPort => 2,
            Pending::WriteKbdOutput => 3,
            Pending::WriteAuxOutput => 4,
            Pending::WriteToAux => 5,
            Pending::KbdArgument => 6,
        }
    }

    fn from_code(code: u8) -> Option<Pending> {
        Some(match code {
            0 => Pending::None,
            1 => Pending::WriteCtr,
            2 => Pending::WriteOutputPort,
            3 => Pending::WriteKbdOutput,
            4 => Pending::WriteAuxOutput,
            5 => Pending::WriteToAux,
            6 => Pending::KbdArgument,
            _ => return None,
        })
    }
}

/// The controller's state, as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub ctr: u8,
    pub output_port: u8,
    pub output: Vec<u8>,
    pub pending: u8,
    pub last_was_command: bool,
}

/// The i8042 at ports 0x60-0x64.
pub struct I8042 {
    state: Mutex<State>,
    irq: EventFd,
    exit: Arc<ExitSignal>,
}

impl I8042 {
    pub fn new(irq: EventFd, exit: Arc<ExitSignal>) -> I8042 {
        I8042 {
            state: Mutex::new(State {
                ctr: CTR_DEFAULT,
                output_port: OUTPUT_PORT_RESET_RELEASED | OUTPUT_PORT_A20,
                output: VecDeque::with_capacity(OUTPUT_LIMIT),
                pending: Pending::None,
                last_was_command: false,
            }),
            irq,
            exit,
        }
    }

    pub fn save(&self) -> I8042State {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        I8042State {
            ctr: state.ctr,
            output_port: state.output_port,
            output: state.output.iter().copied().collect(),
            pending: state.pending.code(),
            last_was_command: state.last_was_command,
        }
    }

    /// Sets a saved state; false (nothing changed) for one no controller can be in.
    pub fn restore(&self, saved: &I8042State) -> bool {
        let Some(pending) = Pending::from_code(saved.pending) else {
            return false;
        };
        if saved.output.len() > OUTPUT_LIMIT {
            return false;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = State {
            ctr: saved.ctr,
            output_port: saved.output_port,
            output: saved.output.iter().copied().collect(),
            pending,
            last_was_command: saved.last_was_command,
        };
        true
    }

    /// Presses Ctrl-Alt-Del (scan code set 2: Ctrl, Alt, then the extended Delete), as the
    /// host's "SendCtrlAltDel" asks: the guest decides what to do with it.
    pub fn ctrl_alt_del(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.reply(&mut state, &[0x14, 0x11, 0xe0, 0x71]);
    }

    fn reset_machine(&self) {
        self.exit.request(VmExitReason::Reset(ResetVia::I8042));
    }

    /// Queues reply bytes and raises the keyboard interrupt if the guest enabled it.
    fn reply(&self, state: &mut State, bytes: &[u8]) {
        for &b in bytes {
            if state.output.len() < OUTPUT_LIMIT {
                state.output.push_back(b);
            }
        }
        if state.ctr & CTR_KBD_INT != 0 && !bytes.is_empty() {
            // A full eventfd counter only means the interrupt is already pending.
            let _ = self.irq.write(1);
        }
    }

    /// Returns false for a command bulkhead does not implement.
    fn command(&self, state: &mut State, cmd: u8) -> bool {
        state.pending = Pending::None;
        match cmd {
            0x20 => self.reply(state, &[state.ctr]),
            0x60 => state.pending = Pending::WriteCtr,
            0xa7 => state.ctr |= CTR_AUX_DISABLE,
            0xa8 => state.ctr &= !CTR_AUX_DISABLE,
            // Auxiliary interface test: "clock line stuck low", i.e. no mouse port.
            0xa9 => self.reply(state, &[0x01]),
            0xaa => self.reply(state, &[0x55]),
            0xab => self.reply(state, &[0x00]),
            0xad => state.ctr |= CTR_KBD_DISABLE,
            0xae => state.ctr &= !CTR_KBD_DISABLE,
            0xc0 => self.reply(state, &[0x00]),
            0xd0 => self.reply(state, &[state.output_port]),
            0xd1 => state.pending = Pending::WriteOutputPort,
            0xd2 => state.pending = Pending::WriteKbdOutput,
            0xd3 => state.pending = Pending::WriteAuxOutput,
            0xd4 => state.pending = Pending::WriteToAux,
            // Pulse output lines: a 0 in bit 0 pulses the CPU reset line.
            0xf0..=0xff => {
                if cmd & 1 == 0 {
                    self.reset_machine();
                }
            }
            _ => return false,
        }
        true
    }

    fn data(&self, state: &mut State, value: u8) {
        match std::mem::replace(&mut state.pending, Pending::None) {
            Pending::WriteCtr => state.ctr = value,
            Pending::WriteOutputPort => {
                state.output_port = value;
                if value & OUTPUT_PORT_RESET_RELEASED == 0 {
                    self.reset_machine();
                }
            }
            Pending::WriteKbdOutput => self.reply(state, &[value]),
            // Echoed without the auxiliary-data status bit: there is no mouse port.
            Pending::WriteAuxOutput => self.reply(state, &[value]),
            Pending::WriteToAux => {}
            Pending::KbdArgument => self.reply(state, &[KBD_ACK]),
            Pending::None => self.keyboard_command(state, value),
        }
    }

    fn keyboard_command(&self, state: &mut State, cmd: u8) {
        match cmd {
            0xff => self.reply(state, &[KBD_ACK, KBD_SELF_TEST_PASSED]),
            0xf2 => self.reply(state, &[KBD_ACK, 0xab, 0x83]),
            0xee => self.reply(state, &[0xee]),
            0xed | 0xf0 | 0xf3 => {
                state.pending = Pending::KbdArgument;
                self.reply(state, &[KBD_ACK]);
            }
            _ => self.reply(state, &[KBD_ACK]),
        }
    }
}

impl ByteRegisters for I8042 {
    fn read_byte(&self, offset: u8) -> u8 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            DATA => state.output.pop_front().unwrap_or(0),
            COMMAND => {
                let mut status = (state.ctr & STATUS_SYSTEM) | STATUS_NOT_INHIBITED;
                if !state.output.is_empty() {
                    status |= STATUS_OUTPUT_FULL;
                }
                if state.last_was_command {
                    status |= STATUS_LAST_WAS_COMMAND;
                }
                status
            }
            // Ports 0x61-0x63 are not the controller's.
            _ => 0xff,
        }
    }

    fn write_byte(&self, offset: u8, value: u8) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            DATA => {
                state.last_was_command = false;
                self.data(&mut state, value);
            }
            COMMAND => {
                state.last_was_command = true;
                if !self.command(&mut state, value) {
                    drop(state);
                    warn_limited!("i8042: refused unsupported controller command {value:#04x}");
                    return false;
                }
            }
            _ => {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (I8042, Arc<ExitSignal>, EventFd) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(irq.try_clone().unwrap(), exit.clone());
        (dev, exit, irq)
    }

    fn read_all(dev: &I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while dev.read_byte(COMMAND) & STATUS_OUTPUT_FULL != 0 {
            out.push(dev.read_byte(DATA));
        }
        out
    }

    #[test]
    fn ctrl_alt_del_queues_the_three_keys_and_interrupts() {
        let (dev, _, irq) = controller();
        let _ = irq.read();
        dev.ctrl_alt_del();
        assert_eq!(read_all(&dev), [0x14, 0x11, 0xe0, 0x71]);
        assert!(irq.read().is_ok(), "no keyboard interrupt");
    }

    #[test]
    fn self_tests_and_config_byte_answer_like_a_real_controller() {
        let (dev, _, irq) = controller();
        dev.write_byte(COMMAND, 0xaa);
        dev.write_byte(COMMAND, 0xab);
        dev.write_byte(COMMAND, 0x20);
        assert_eq!(read_all(&dev), vec![0x55, 0x00, CTR_DEFAULT]);
        assert!(irq.read().unwrap() >= 1, "keyboard interrupt not raised");
        dev.write_byte(COMMAND, 0x60);
        dev.write_byte(DATA, 0x00);
        dev.write_byte(COMMAND, 0x20);
        assert_eq!(read_all(&dev), vec![0x00]);
        assert!(
            irq.read().is_err(),
            "interrupt raised with interrupts disabled"
        );
    }

    #[test]
    fn status_reports_no_keylock_and_the_system_flag() {
        let (dev, _, _) = controller();
        let status = dev.read_byte(COMMAND);
        assert_ne!(status & STATUS_NOT_INHIBITED, 0);
        assert_ne!(status & STATUS_SYSTEM, 0);
        assert_eq!(status & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn aux_loopback_comes_back_without_the_aux_flag_so_there_is_no_mouse() {
        let (dev, _, _) = controller();
        dev.write_byte(COMMAND, 0xd3);
        dev.write_byte(DATA, 0x5a);
        let status = dev.read_byte(COMMAND);
        assert_eq!(status & (1 << 5), 0);
        assert_eq!(read_all(&dev), vec![0x5a]);
        dev.write_byte(COMMAND, 0xa9);
        assert_eq!(read_all(&dev), vec![0x01]);
    }

    #[test]
    fn keyboard_reset_and_commands_with_arguments_are_acknowledged() {
        let (dev, _, _) = controller();
        dev.write_byte(DATA, 0xff);
        assert_eq!(read_all(&dev), vec![KBD_ACK, KBD_SELF_TEST_PASSED]);
        dev.write_byte(DATA, 0xed);
        dev.write_byte(DATA, 0x07);
        assert_eq!(read_all(&dev), vec![KBD_ACK, KBD_ACK]);
    }

    #[test]
    fn pulse_reset_and_output_port_reset_end_the_vm() {
        let (dev, exit, _) = controller();
        dev.write_byte(COMMAND, 0xfe);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset(ResetVia::I8042)));
        let (dev, exit, _) = controller();
        dev.write_byte(COMMAND, 0xd1);
        dev.write_byte(DATA, 0x02);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset(ResetVia::I8042)));
    }

    #[test]
    fn pulsing_other_lines_or_writing_the_output_port_with_reset_released_does_not_reset() {
        let (dev, exit, _) = controller();
        dev.write_byte(COMMAND, 0xff);
        dev.write_byte(COMMAND, 0xd1);
        dev.write_byte(DATA, 0x03);
        assert!(!exit.is_stopping());
    }

    #[test]
    fn output_buffer_stays_bounded_however_much_the_guest_asks() {
        let (dev, _, _) = controller();
        for _ in 0..1000 {
            dev.write_byte(DATA, 0xf2);
        }
        assert_eq!(read_all(&dev).len(), OUTPUT_LIMIT);
        assert_eq!(dev.read_byte(DATA), 0);
    }

    #[test]
    fn unknown_commands_are_refused_without_side_effects() {
        let (dev, exit, _) = controller();
        let state = &mut dev.state.lock().unwrap();
        assert!(!dev.command(state, 0x42));
        assert!(state.output.is_empty());
        assert!(!exit.is_stopping());
    }

    #[test]
    fn an_unknown_command_is_refused_on_the_bus_so_it_is_counted() {
        use crate::devices::BusDevice;
        let (dev, _, _) = controller();
        assert!(!BusDevice::write(&dev, u64::from(COMMAND), &[0x42]));
        assert!(BusDevice::write(&dev, u64::from(COMMAND), &[0xaa]));
    }
}
