/* triple_fault: a fault the guest can not handle at all.
 *
 * Loads an IDT with limit 0 and executes ud2: the #UD can not be delivered, nor the #DF that
 * follows, so the CPU shuts down (a triple fault). A guest can do this at will; the VMM must
 * end that VM cleanly and alone. Same as exitcodes.c mode=triple.
 * Expected: the VM ends with status 81 (triple fault).
 */
#include "lib/attack.h"

void guest_main(void) {
    attack_begin("triple_fault");
    struct { u16 limit; u64 base; } __attribute__((packed)) idt = {0, 0};
    __asm__ volatile("lidt %0; ud2" : : "m"(idt));
    puts("attack: ud2 returned\n");
    exit_guest(1);
}
