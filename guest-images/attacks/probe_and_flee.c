/* probe_and_flee: a hostile kernel's first moments. It never reports boot complete and never
 * lingers: at once it sends the floppy controller a command byte (0x8e, DRIVE SPECIFICATION,
 * the command VENOM's FIFO overflow used), reads its main status register, sweeps 64
 * unhandled ports (0x4000-0x403f), and exits. Detection must not wait for a boot report or a
 * grace period to judge it, and must not lose what it saw when the VM ends a moment later.
 * Models CVE-2015-3456 reconnaissance by a guest that leaves before anyone looks.
 * Expected: legacy_device_probe for 0x3f5 (write) and 0x3f4 (read); pio_scan 4 times
 * (16 ports each); exit status 0.
 */
#include "lib/attack.h"

void guest_main(void) {
    outb(0x3f5, 0x8e);
    (void)inb(0x3f4);
    for (u16 port = 0x4000; port < 0x4040; port++) (void)inb(port);
    exit_guest(0);
}
