/* msr_probe: reading and writing MSRs that do not exist.
 *
 * Installs an IDT whose #GP gate (vector 13) points at gp_entry (msr_probe_stub.S), which
 * steps over a faulting rdmsr/wrmsr and counts it, then does rdmsr of MSR 0x12345678 and
 * wrmsr of MSR 0x12345679. A guest enumerating MSRs is hunting for one the hypervisor
 * handles badly (an MSR emulation bug that leaks host state or crashes the host); both
 * accesses must fault with #GP. Today KVM injects the #GP itself; a hardened VMM filters
 * unknown MSRs to user space, counts them, and injects the #GP.
 * Prints `attack: gp faults N`; exits 0 when both faulted, 1 otherwise (2 from the handler
 * on any other #GP; any other exception ends in a triple fault, status 81, since only
 * vectors up to 13 are in the IDT and only 13 is present).
 */
#include "lib/attack.h"

#define MSR_READ 0x12345678u
#define MSR_WRITE 0x12345679u

struct gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset_mid;
    u32 offset_high;
    u32 reserved;
} __attribute__((packed));

extern void gp_entry(void);
volatile u32 gp_faults;
static struct gate idt[14] __attribute__((aligned(16)));

static void install_gp_handler(void) {
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    u64 handler = (u64)gp_entry;
    struct gate *g = &idt[13];
    g->offset_low = (u16)handler;
    g->selector = cs;
    g->ist = 0;
    g->type_attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
    g->offset_mid = (u16)(handler >> 16);
    g->offset_high = (u32)(handler >> 32);
    g->reserved = 0;
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}

void guest_main(void) {
    attack_begin("msr_probe");
    install_gp_handler();
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(MSR_READ), "a"(0), "d"(0) : "memory");
    u32 after_read = gp_faults;
    __asm__ volatile("wrmsr" : : "c"(MSR_WRITE), "a"(0x1234u), "d"(0u) : "memory");
    u32 after_write = gp_faults;
    puts("attack: rdmsr ");
    puts(after_read == 1 ? "faulted" : "did not fault");
    puts(", wrmsr ");
    puts(after_write == after_read + 1 ? "faulted" : "did not fault");
    putc('\n');
    puts("attack: gp faults ");
    put_dec(after_write);
    putc('\n');
    attack_end(after_read == 1 && after_write == 2 ? 0 : 1);
}
