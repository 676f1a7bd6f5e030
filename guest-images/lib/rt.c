#include "rt.h"

const u8 *boot_zero_page;
const u8 *boot_pvh_info;

void putc(char c) {
    /* Wait for the transmit holding register to be empty (LSR bit 5). */
    for (int i = 0; i < 100000 && !(inb(SERIAL_PORT + 5) & 0x20); i++) {
    }
    outb(SERIAL_PORT, (u8)c);
}

void puts(const char *s) {
    while (*s) putc(*s++);
}

void put_dec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    puts(&buf[i]);
}

void put_hex(u64 v) {
    static const char digits[] = "0123456789abcdef";
    puts("0x");
    int started = 0;
    for (int shift = 60; shift >= 0; shift -= 4) {
        int d = (int)((v >> shift) & 0xf);
        if (d || started || shift == 0) {
            putc(digits[d]);
            started = 1;
        }
    }
}

void boot_complete(void) { outb(BOOT_COMPLETE_PORT, 1); }

/* KVM's pvclock_vcpu_time_info, which the host keeps up to date. */
struct pvclock {
    u32 version;
    u32 pad0;
    u64 tsc_timestamp;
    u64 system_time;
    u32 tsc_to_system_mul;
    signed char tsc_shift;
    u8 flags;
    u8 pad[2];
} __attribute__((packed));

#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01

static volatile struct pvclock kvmclock __attribute__((aligned(64)));
static int kvmclock_on;

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

u64 now_ns(void) {
    if (!kvmclock_on) {
        /* The guest runs identity-mapped: the structure's address is its physical one. */
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&kvmclock | 1);
        kvmclock_on = 1;
    }
    u32 version;
    u64 ns;
    do {
        version = kvmclock.version;
        __asm__ volatile("" ::: "memory");
        u64 delta = rdtsc() - kvmclock.tsc_timestamp;
        int shift = kvmclock.tsc_shift;
        delta = shift < 0 ? delta >> -shift : delta << shift;
        ns = kvmclock.system_time +
             (u64)(((unsigned __int128)delta * kvmclock.tsc_to_system_mul) >> 32);
        __asm__ volatile("" ::: "memory");
    } while ((version & 1) || version != kvmclock.version);
    return ns;
}

void wait_ms(u64 ms) {
    u64 until = now_ns() + ms * 1000000;
    while (now_ns() < until) __asm__ volatile("pause");
}

u8 serial_getc(void) {
    while (!(inb(SERIAL_PORT + 5) & 1)) wait_ms(1);
    return inb(SERIAL_PORT);
}

void halt_forever(void) {
    for (;;) __asm__ volatile("cli; hlt");
}

void exit_guest(u8 status) {
    outb(GUEST_EXIT_PORT, status);
    halt_forever();
}

const char *cmdline(void) {
    u64 ptr = 0;
    if (boot_pvh_info) {
        ptr = *(const u64 *)(boot_pvh_info + PVH_CMDLINE_PADDR);
    } else if (boot_zero_page) {
        ptr = *(const u32 *)(boot_zero_page + BP_CMD_LINE_PTR);
    }
    return ptr ? (const char *)ptr : "";
}

int initrd(u64 *addr, u64 *size) {
    if (boot_pvh_info) {
        if (*(const u32 *)(boot_pvh_info + PVH_NR_MODULES) == 0) return 0;
        const u64 *module = (const u64 *)*(const u64 *)(boot_pvh_info + PVH_MODLIST_PADDR);
        *addr = module[0];
        *size = module[1];
        return 1;
    }
    if (!boot_zero_page) return 0;
    *addr = *(const u32 *)(boot_zero_page + BP_RAMDISK_IMAGE);
    *size = *(const u32 *)(boot_zero_page + BP_RAMDISK_SIZE);
    return *size != 0;
}

const char *cmdline_value(const char *key, int *len) {
    const char *p = cmdline();
    while (*p) {
        while (*p == ' ') p++;
        const char *k = key;
        const char *t = p;
        while (*k && *t == *k) { t++; k++; }
        if (!*k && *t == '=') {
            const char *v = t + 1;
            int n = 0;
            while (v[n] && v[n] != ' ') n++;
            *len = n;
            return v;
        }
        while (*p && *p != ' ') p++;
    }
    *len = 0;
    return 0;
}

u64 cmdline_u64(const char *key, u64 dflt) {
    int len;
    const char *v = cmdline_value(key, &len);
    if (!v || len == 0) return dflt;
    u64 n = 0;
    for (int i = 0; i < len; i++) {
        if (v[i] < '0' || v[i] > '9') return dflt;
        n = n * 10 + (u64)(v[i] - '0');
    }
    return n;
}

int str_eq(const char *a, int alen, const char *b) {
    int i = 0;
    for (; i < alen; i++) {
        if (a[i] != b[i]) return 0;
    }
    return b[i] == 0;
}

void *memset(void *dst, int c, unsigned long n) {
    u8 *d = dst;
    for (unsigned long i = 0; i < n; i++) d[i] = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, unsigned long n) {
    u8 *d = dst;
    const u8 *s = src;
    for (unsigned long i = 0; i < n; i++) d[i] = s[i];
    return dst;
}
