#include "rt.h"

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

void halt_forever(void) {
    for (;;) __asm__ volatile("cli; hlt");
}

void exit_guest(u8 status) {
    outb(GUEST_EXIT_PORT, status);
    halt_forever();
}

const char *cmdline(const u8 *zero_page) {
    u32 ptr = *(const u32 *)(zero_page + BP_CMD_LINE_PTR);
    return ptr ? (const char *)(u64)ptr : "";
}

const char *cmdline_value(const u8 *zero_page, const char *key, int *len) {
    const char *p = cmdline(zero_page);
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

u64 cmdline_u64(const u8 *zero_page, const char *key, u64 dflt) {
    int len;
    const char *v = cmdline_value(zero_page, key, &len);
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
