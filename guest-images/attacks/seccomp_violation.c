/* seccomp_violation: the "VMM compromised" drill.
 *
 * Writes 0x5c to port 0xf6 and exits 0. In debug builds with the test hook, the VMM treats a
 * write to 0xf6 as "the guest has exploited the VMM" and makes a system call its seccomp
 * filter forbids, so the sandbox's reaction (the process killed, the alert raised) can be
 * tested end to end. Without the hook the port is simply unassigned.
 * Expected today: pio_unassigned_writes=1, exit status 0.
 */
#include "lib/attack.h"

#define EXPLOIT_DRILL_PORT 0xf6
#define EXPLOIT_DRILL_BYTE 0x5c

void guest_main(void) {
    attack_begin("seccomp_violation");
    outb(EXPLOIT_DRILL_PORT, EXPLOIT_DRILL_BYTE);
    puts("attack: still running after the drill write\n");
    attack_end(0);
}
