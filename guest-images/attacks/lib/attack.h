/* The part every attack guest shares: announce the attack once boot has settled. */
#ifndef BULKHEAD_ATTACKS_ATTACK_H
#define BULKHEAD_ATTACKS_ATTACK_H

#include "../../lib/rt.h"

/* Tells the VMM boot is complete (port 0xf5), then prints `attack: <rule>`. Every guest calls
 * this first, so whatever the VMM counts afterwards is the attack and only the attack. */
static inline void attack_begin(const char *rule) {
    boot_complete();
    puts("attack: ");
    puts(rule);
    putc('\n');
}

/* Ends the attack guest with `status`, after lingering about a tenth of a second (10,000
 * reads of the I/O delay port, one exit each) so that a response the VMM decides outside the
 * guest's path, such as --on-violation stop-vm, lands while the guest still runs. */
static inline __attribute__((noreturn)) void attack_end(u8 status) {
    for (int i = 0; i < 10000; i++) (void)inb(0x80);
    puts("attack: done\n");
    exit_guest(status);
}

#endif
