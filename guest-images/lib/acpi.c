/* See acpi.h. The tables are ordinary RAM: plain loads read them. */
#include "acpi.h"

/* No table of bulkhead's is larger; a longer length field is corrupt, not believed. */
#define TABLE_MAX 0x10000u
#define RSDP_SCAN_START 0xe0000ULL
#define RSDP_SCAN_END 0x100000ULL
/* Offsets of the RSDP pointer in the boot information. */
#define BP_ACPI_RSDP_ADDR 0x070
#define PVH_RSDP_PADDR 32

static u8 sum(const u8 *p, u64 len) {
    u8 s = 0;
    for (u64 i = 0; i < len; i++) s = (u8)(s + p[i]);
    return s;
}

static int sig_is(const u8 *p, const char *sig) {
    return p[0] == (u8)sig[0] && p[1] == (u8)sig[1] && p[2] == (u8)sig[2] && p[3] == (u8)sig[3];
}

static u32 le32(const u8 *p) { return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static u64 le64(const u8 *p) { return (u64)le32(p) | (u64)le32(p + 4) << 32; }

static const u8 *rsdp(void) {
    u64 addr = 0;
    if (boot_pvh_info) addr = le64(boot_pvh_info + PVH_RSDP_PADDR);
    else if (boot_zero_page) addr = le64(boot_zero_page + BP_ACPI_RSDP_ADDR);
    if (!addr) {
        for (u64 a = RSDP_SCAN_START; a < RSDP_SCAN_END; a += 16) {
            const u8 *p = (const u8 *)a;
            if (sig_is(p, "RSD ") && sig_is(p + 4, "PTR ")) { addr = a; break; }
        }
    }
    const u8 *p = (const u8 *)addr;
    if (!p || !(sig_is(p, "RSD ") && sig_is(p + 4, "PTR "))) return 0;
    if (sum(p, 20) != 0 || p[15] < 2 || sum(p, 36) != 0) return 0;
    return p;
}

/* A table at `addr` if its signature and checksum hold. */
static const u8 *checked(u64 addr, const char *sig) {
    const u8 *t = (const u8 *)addr;
    if (!t || !sig_is(t, sig)) return 0;
    u32 len = le32(t + 4);
    if (len < 36 || len > TABLE_MAX) return 0;
    return sum(t, len) == 0 ? t : 0;
}

const u8 *acpi_table(const char *sig) {
    const u8 *r = rsdp();
    if (!r) return 0;
    const u8 *xsdt = checked(le64(r + 24), "XSDT");
    if (!xsdt) return 0;
    if (sig_is((const u8 *)sig, "DSDT")) {
        const u8 *fadt = acpi_table("FACP");
        return fadt ? checked(le64(fadt + FADT_X_DSDT), "DSDT") : 0;
    }
    for (u32 off = 36; off + 8 <= le32(xsdt + 4); off += 8) {
        const u8 *t = checked(le64(xsdt + off), sig);
        if (t) return t;
    }
    return 0;
}

int acpi_madt_cpus(u8 *ids, int max) {
    const u8 *madt = acpi_table("APIC");
    if (!madt) return -1;
    int n = 0;
    u32 len = le32(madt + 4);
    for (u32 off = 44; off + 2 <= len && madt[off + 1] >= 2 && off + madt[off + 1] <= len;
         off += madt[off + 1]) {
        const u8 *e = madt + off;
        if (e[0] == 0 && e[1] >= 8 && (le32(e + 4) & 1) && n < max) ids[n++] = e[3];
    }
    return n;
}

/* Small resource descriptors: IO is 0x47 (8 bytes); large ones: Memory32Fixed is 0x86. */
#define DESC_IO 0x47
#define DESC_MEMORY32_FIXED 0x86

u64 acpi_device_resource(const char *hid, const u8 *after, const u8 **next) {
    const u8 *dsdt = acpi_table("DSDT");
    if (!dsdt) return 0;
    const u8 *end = dsdt + le32(dsdt + 4);
    int hid_len = 0;
    while (hid[hid_len]) hid_len++;
    const u8 *p = after ? after : dsdt + 36;
    for (; p + hid_len + 1 < end; p++) {
        int i = 0;
        while (i < hid_len && p[i] == (u8)hid[i]) i++;
        if (i < hid_len || p[hid_len] != 0) continue;
        /* The device's _CRS follows its _HID: take the first window descriptor after it,
         * unless the next device's _HID comes first. */
        for (const u8 *d = p + hid_len; d + 12 <= end; d++) {
            if (sig_is(d, "_HID")) return 0;
            if (d[0] == DESC_MEMORY32_FIXED && d[1] == 9 && d[2] == 0) {
                *next = d;
                return le32(d + 4);
            }
            if (d[0] == DESC_IO && (d[1] & ~1) == 0) {
                *next = d;
                return (u64)d[2] | (u64)d[3] << 8;
            }
        }
        return 0;
    }
    return 0;
}

int acpi_s5_sleep_type(void) {
    const u8 *dsdt = acpi_table("DSDT");
    if (!dsdt) return -1;
    const u8 *end = dsdt + le32(dsdt + 4);
    for (const u8 *p = dsdt + 36; p + 10 <= end; p++) {
        /* Name(_S5_, Package(n) { SLP_TYPa, ... }): NameOp, the name, PackageOp, a one-byte
         * PkgLength, the element count, then an integer. */
        if (!(p[0] == 0x08 && sig_is(p + 1, "_S5_") && p[5] == 0x12)) continue;
        const u8 *v = p + 8;
        if (v[0] == 0x00) return 0;
        if (v[0] == 0x01) return 1;
        if (v[0] == 0x0a) return v[1];
        return -1;
    }
    return -1;
}
