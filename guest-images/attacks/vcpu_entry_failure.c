/* vcpu_entry_failure: making KVM unable to run the vCPU.
 *
 * `variant=` on the command line picks how (default: mmio-fetch):
 *   mmio-fetch   jump to 0xc0001000, in the MMIO gap with no RAM behind it. KVM can not
 *                fetch instructions from MMIO, fails to emulate, and exits with
 *                KVM_EXIT_INTERNAL_ERROR. This fails on hardware KVM too.
 *   int3         execute int3: the nested PVM host's instruction emulator lacks it
 *                (KVM_EXIT_INTERNAL_ERROR there; on hardware KVM it is an ordinary #BP).
 *   cmpxchg16b   execute lock cmpxchg16b: also missing from the PVM emulator.
 * A guest that can make the vCPU fail must not take the VMM (or other VMs) down with it: the
 * VMM must end this VM with status 82 (internal error) or 83 (failed entry) and report it.
 * If the instruction somehow completes, the guest prints so and exits 1.
 */
#include "lib/attack.h"

#define MMIO_GAP_CODE 0xc0001000ULL

static u64 pair[2] __attribute__((aligned(16)));

void guest_main(void) {
    attack_begin("vcpu_entry_failure");
    int len;
    const char *v = cmdline_value("variant", &len);
    if (!v || str_eq(v, len, "mmio-fetch")) {
        puts("attack: variant mmio-fetch\n");
        ((void (*)(void))MMIO_GAP_CODE)();
    } else if (str_eq(v, len, "int3")) {
        puts("attack: variant int3\n");
        __asm__ volatile("int3");
    } else if (str_eq(v, len, "cmpxchg16b")) {
        puts("attack: variant cmpxchg16b\n");
        u64 lo = 0, hi = 0;
        __asm__ volatile("lock cmpxchg16b %0"
                         : "+m"(*pair), "+a"(lo), "+d"(hi)
                         : "b"(1ULL), "c"(2ULL)
                         : "memory", "cc");
    } else {
        puts("attack: unknown variant\n");
        exit_guest(2);
    }
    puts("attack: the vCPU kept running\n");
    exit_guest(1);
}
