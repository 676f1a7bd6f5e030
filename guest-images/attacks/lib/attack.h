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

#endif
