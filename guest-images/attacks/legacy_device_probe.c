/* legacy_device_probe: probing legacy PC devices bulkhead never emulates.
 *
 * Reads the floppy controller's main status register (0x3f4) and data FIFO (0x3f5), the
 * primary and secondary IDE status registers (0x1f7, 0x177), and does a PCI configuration
 * mechanism #1 access (outl 0x80000000 to 0xcf8, inl 0xcfc). A guest looking for an old,
 * complex device model to exploit starts like this. Models VENOM, CVE-2015-3456 (QEMU's
 * floppy controller FIFO overflow, reachable from any guest because the FDC was always
 * there).
 * Expected: 5 unassigned port reads and 1 unassigned port write (every read all-ones).
 */
#include "lib/attack.h"

void guest_main(void) {
    attack_begin("legacy_device_probe");
    u8 fdc_msr = inb(0x3f4);
    u8 fdc_fifo = inb(0x3f5);
    u8 ide0 = inb(0x1f7);
    u8 ide1 = inb(0x177);
    outl(0xcf8, 0x80000000u);
    u32 pci = inl(0xcfc);
    puts("attack: fdc msr ");
    put_hex(fdc_msr);
    puts(" fifo ");
    put_hex(fdc_fifo);
    puts(" ide ");
    put_hex(ide0);
    putc(' ');
    put_hex(ide1);
    puts(" pci ");
    put_hex(pci);
    putc('\n');
    attack_end(0);
}
