/* mmio_scan: a sweep of the MMIO gap below the virtio window.
 *
 * Reads one 32-bit word from each of 32 pages 0xc0000000 + n * 0x1000 (n = 0..31), where
 * no device and no RAM lies: reconnaissance for an MMIO device model to attack (the MMIO
 * face of the VENOM, CVE-2015-3456, approach).
 * Expected: mmio_unassigned_reads=32, every read all-ones.
 */
#include "lib/attack.h"

#define GAP 0xc0000000ULL
#define PAGES 32

void guest_main(void) {
    attack_begin("mmio_scan");
    u32 all_ones = 0;
    for (u64 n = 0; n < PAGES; n++) all_ones += mmio_read32(GAP + n * 0x1000) == 0xffffffffu;
    puts("attack: pages read all-ones ");
    put_dec(all_ones);
    putc('\n');
    attack_end(0);
}
