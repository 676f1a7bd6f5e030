/* exit_storm: as many VM exits as the guest can cause.
 *
 * Reads port 0x80 (the I/O delay port, which bulkhead handles: reads are all-ones) N times
 * in a register-only loop, N = `storm=N` on the command line (default 300000), then exits 0.
 * Each read is a full exit to the VMM's vCPU thread: a tenant burning the host's CPU (and
 * the VMM's exit path) while doing nothing wrong per access. Models exit-flood denial of
 * service against the host.
 * Expected: vcpu_exits close to N; no unassigned accesses.
 */
#include "lib/attack.h"

#define IO_DELAY_PORT 0x80

void guest_main(void) {
    attack_begin("exit_storm");
    u64 n = cmdline_u64("storm", 300000);
    for (u64 i = 0; i < n; i++) {
        u8 v;
        __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"((u16)IO_DELAY_PORT));
    }
    puts("attack: exits done ");
    put_dec(n);
    putc('\n');
    attack_end(0);
}
