/* exit_storm: as many VM exits as the guest can cause, for a time.
 *
 * Reads port 0x80 (the I/O delay port, which bulkhead handles: reads are all-ones) in a
 * register-only loop for `storm_ms=N` milliseconds of wall time (default 3000, read from
 * kvmclock, so the storm lasts as long on a fast host as on a slow one), then exits 0. Each
 * read is a full exit to the VMM's vCPU thread: a tenant burning the host's CPU (and the
 * VMM's exit path) while doing nothing wrong per access. Models exit-flood denial of service
 * against the host.
 * Expected: an exit_storm alert; no unassigned accesses.
 */
#include "lib/attack.h"

#define IO_DELAY_PORT 0x80

void guest_main(void) {
    attack_begin("exit_storm");
    u64 until = now_ns() + cmdline_u64("storm_ms", 3000) * 1000000;
    u64 n = 0;
    while (now_ns() < until) {
        for (int i = 0; i < 1024; i++) {
            u8 v;
            __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"((u16)IO_DELAY_PORT));
        }
        n += 1024;
    }
    puts("attack: exits done ");
    put_dec(n);
    putc('\n');
    attack_end(0);
}
