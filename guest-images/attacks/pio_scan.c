/* pio_scan: a sweep of I/O ports no device owns.
 *
 * Reads one byte from each of the 32 ports 0x4000..0x401f, which lie in no legacy PC range:
 * reconnaissance for a device model to attack (the port-I/O face of the VENOM,
 * CVE-2015-3456, approach of finding a forgotten device).
 * Expected: pio_unassigned_reads=32, every read all-ones.
 */
#include "lib/attack.h"

#define FIRST_PORT 0x4000
#define PORTS 32

void guest_main(void) {
    attack_begin("pio_scan");
    u32 all_ones = 0;
    for (u32 i = 0; i < PORTS; i++) all_ones += inb((u16)(FIRST_PORT + i)) == 0xff;
    puts("attack: ports read all-ones ");
    put_dec(all_ones);
    putc('\n');
    attack_end(0);
}
