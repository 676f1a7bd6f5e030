/* Runtime for bulkhead's freestanding test guests: port I/O, the serial console, the guest
 * ports, and the boot information bulkhead passes. Plain integer code only: the nested PVM
 * host's instruction emulator lacks SSE/XSAVE paths and int3. */
#ifndef BULKHEAD_GUEST_RT_H
#define BULKHEAD_GUEST_RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

/* Starting application processors: the real-mode trampoline's page (SIPI vector 0x10) and
 * the x2APIC registers that send INIT and STARTUP. */
#define TRAMPOLINE 0x10000ULL
#define SIPI_VECTOR (TRAMPOLINE >> 12)
#define MSR_APIC_BASE 0x1b
#define APIC_BASE_EXTD (1ULL << 10)
#define APIC_BASE_EN (1ULL << 11)
#define MSR_X2APIC_ICR 0x830
#define ICR_INIT 0x4500ULL
#define ICR_STARTUP 0x4600ULL

#define GUEST_EXIT_PORT 0xf4
#define BOOT_COMPLETE_PORT 0xf5
#define SERIAL_PORT 0x3f8
#define I8042_COMMAND_PORT 0x64

/* Offsets into the Linux zero page (struct boot_params). */
#define BP_E820_ENTRIES 0x1e8
#define BP_SETUP_SECTS 0x1f1
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define E820_RAM 1

/* Offsets into the PVH struct hvm_start_info. */
#define PVH_MAGIC 0x336ec578u
#define PVH_NR_MODULES 12
#define PVH_MODLIST_PADDR 16
#define PVH_CMDLINE_PADDR 24
#define PVH_MEMMAP_ENTRIES 48

/* How bulkhead entered the guest: exactly one of these is set before guest_main runs. */
extern const u8 *boot_zero_page; /* Linux 64-bit boot protocol (RSI) */
extern const u8 *boot_pvh_info;  /* PVH (EBX) */

struct e820_entry {
    u64 addr;
    u64 size;
    u32 type;
} __attribute__((packed));

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}
static inline u64 mmio_read64(u64 addr) { return *(volatile u64 *)addr; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }

/* Nanoseconds of wall time from KVM's paravirtual clock (kvmclock, MSR 0x4b564d01 on the
 * calling vCPU; the first call turns it on). For waiting a time rather than a count of
 * iterations, whose duration depends on the host. Boot vCPU only. */
u64 now_ns(void);
/* Spins on the clock, with no exit, until `ms` milliseconds have passed. */
void wait_ms(u64 ms);
/* Waits for a byte on the serial console and returns it, looking about a thousand times a
 * second: a guest polling the line status as fast as it can exits tens of thousands of times a
 * second, which is an exit storm (and bulkhead says so). */
u8 serial_getc(void);

/* How long a test guest waits for something of the VMM's (a used buffer, a status bit, an AP
 * checking in) before it calls the wait failed: far more than any host needs, and measured by
 * the clock, so a fast host does not shorten it nor a slow one stretch it. */
#define WAIT_LIMIT_MS 5000ULL
static inline u64 deadline_after_ms(u64 ms) { return now_ns() + ms * 1000000ULL; }
static inline int past(u64 deadline) { return now_ns() >= deadline; }

void putc(char c);
void puts(const char *s);
void put_dec(u64 v);
void put_hex(u64 v);
void boot_complete(void);
__attribute__((noreturn)) void exit_guest(u8 status);
__attribute__((noreturn)) void halt_forever(void);

/* The kernel command line bulkhead passed. */
const char *cmdline(void);
/* Value of `key=...` on the command line as a string (NULL if absent); `len` gets its length. */
const char *cmdline_value(const char *key, int *len);
/* Value of `key=N` as a number, or `dflt` when absent or not a number. */
u64 cmdline_u64(const char *key, u64 dflt);
/* Where the initrd was placed; returns 0 when there is none. */
int initrd(u64 *addr, u64 *size);
int str_eq(const char *a, int alen, const char *b);

void *memset(void *dst, int c, unsigned long n);
void *memcpy(void *dst, const void *src, unsigned long n);

#endif
