/* The part every attack guest shares: announce the attack, and end it. */
#ifndef BULKHEAD_ATTACKS_ATTACK_H
#define BULKHEAD_ATTACKS_ATTACK_H

#include "../../lib/rt.h"

/* `quick=1` on the command line: a guest that attacks at once and flees. It never reports boot
 * complete and exits the moment its attack is done, as a hostile kernel would; detection must
 * not depend on either. */
static inline int attack_quick(void) { return cmdline_u64("quick", 0) != 0; }

/* Tells the VMM boot is complete (port 0xf5), unless `quick=1`, then prints `attack: <rule>`.
 * Every guest calls this first. */
static inline void attack_begin(const char *rule) {
    if (!attack_quick()) boot_complete();
    puts("attack: ");
    puts(rule);
    putc('\n');
}

/* Ends the attack guest with `status`, after lingering `linger_ms=N` milliseconds of wall
 * time (default 100; none with `quick=1`), so that a response the VMM decides outside the
 * guest's path, such as --on-violation stop-vm, can land while the guest still runs. */
static inline __attribute__((noreturn)) void attack_end(u8 status) {
    if (!attack_quick()) wait_ms(cmdline_u64("linger_ms", 100));
    puts("attack: done\n");
    exit_guest(status);
}

#endif
