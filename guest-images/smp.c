/* smp: every vCPU checks in through the serial port.
 *
 * The BSP finds the MP table (as Linux does without ACPI), checks its checksums, and reads the
 * APIC id of every processor it lists; when the machine has ACPI tables, the MADT must list
 * the same processors. It prints its own check-in line, then wakes each AP in
 * turn with INIT and SIPI through the x2APIC ICR and waits for it to check in. Exits 0 when
 * every listed processor checked in, 1 otherwise. The test compares the count with --vcpus.
 */
#include "lib/rt.h"
#include "lib/acpi.h"

#define MP_SCAN_START 0x9fc00ULL
#define MP_SCAN_END 0xa0000ULL
#define MAX_CPUS 255

extern u8 ap_tramp_start[], ap_tramp_end[];
extern u64 ap_flag_offset;

static u8 checksum(const u8 *p, u64 len) {
    u8 sum = 0;
    for (u64 i = 0; i < len; i++) sum = (u8)(sum + p[i]);
    return sum;
}

static void fail(const char *why) {
    puts("smp: FAIL: ");
    puts(why);
    puts("\n");
    exit_guest(1);
}

/* Fills `ids` with the APIC ids of the enabled processors in the MP table; returns the count. */
static int mp_processors(u8 *ids) {
    const u8 *fp = 0;
    for (u64 a = MP_SCAN_START; a < MP_SCAN_END; a += 16) {
        const u8 *p = (const u8 *)a;
        if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_') { fp = p; break; }
    }
    if (!fp) fail("no MP floating pointer");
    if (checksum(fp, 16) != 0) fail("MP floating pointer checksum");
    const u8 *table = (const u8 *)(u64)*(const u32 *)(fp + 4);
    if (!(table[0] == 'P' && table[1] == 'C' && table[2] == 'M' && table[3] == 'P')) fail("no PCMP table");
    u16 length = *(const u16 *)(table + 4);
    u16 entries = *(const u16 *)(table + 34);
    if (checksum(table, length) != 0) fail("MP table checksum");
    int n = 0;
    const u8 *e = table + 44;
    for (u16 i = 0; i < entries && e < table + length; i++) {
        if (e[0] == 0) {
            if ((e[3] & 1) && n < MAX_CPUS) ids[n++] = e[1];
            e += 20;
        } else {
            e += 8;
        }
    }
    return n;
}

static void delay(u64 loops) {
    for (volatile u64 i = 0; i < loops; i++) {
    }
}

/* What bulkhead promises about CPUID: no VMX or SVM (no nested virtualization), the
 * hypervisor bit set, and the logical processor count equal to the vCPU count. */
static void check_cpuid(int vcpus) {
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (c & (1u << 5)) fail("CPUID shows VMX");
    if (!(c & (1u << 31))) fail("CPUID lacks the hypervisor bit");
    if ((int)((b >> 16) & 0xff) != vcpus) fail("CPUID logical processor count differs from the MP table");
    cpuid(0x80000000u, &a, &b, &c, &d);
    if (a >= 0x80000001u) {
        cpuid(0x80000001u, &a, &b, &c, &d);
        if (c & (1u << 2)) fail("CPUID shows SVM");
    }
    puts("cpuid: nested virtualization hidden, hypervisor bit set\n");
}

static u8 my_apic_id(void) {
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    return (u8)(b >> 24);
}

void guest_main(void) {
    u8 ids[MAX_CPUS];
    int n = mp_processors(ids);
    u8 bsp = my_apic_id();
    puts("smp: MP table lists ");
    put_dec((u64)n);
    puts(" processors\n");
    check_cpuid(n);
    u8 madt_ids[MAX_CPUS];
    int m = acpi_madt_cpus(madt_ids, MAX_CPUS);
    if (m >= 0) {
        if (m != n) fail("the MADT and the MP table list different processor counts");
        for (int i = 0; i < n; i++) {
            if (madt_ids[i] != ids[i]) fail("the MADT and the MP table list different APIC ids");
        }
        puts("smp: MADT lists the same ");
        put_dec((u64)m);
        puts(" processors\n");
    } else {
        puts("smp: no ACPI tables\n");
    }
    puts("vcpu ");
    put_dec(bsp);
    puts(" checked in\n");

    memcpy((void *)TRAMPOLINE, ap_tramp_start, (u64)(ap_tramp_end - ap_tramp_start));
    volatile u32 *flag = (volatile u32 *)(TRAMPOLINE + ap_flag_offset);
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_EN | APIC_BASE_EXTD);

    int up = 1;
    for (int i = 0; i < n; i++) {
        u8 id = ids[i];
        if (id == bsp) continue;
        *flag = 0;
        wrmsr(MSR_X2APIC_ICR, ((u64)id << 32) | ICR_INIT);
        delay(100);
        for (int attempt = 0; attempt < 2 && *flag == 0; attempt++) {
            wrmsr(MSR_X2APIC_ICR, ((u64)id << 32) | ICR_STARTUP | SIPI_VECTOR);
            for (u64 until = deadline_after_ms(WAIT_LIMIT_MS); *flag == 0 && !past(until);) {
            }
        }
        if (*flag != (u32)id + 1) {
            puts("smp: vcpu ");
            put_dec(id);
            puts(" did not check in\n");
            exit_guest(1);
        }
        up++;
    }
    puts("smp: all ");
    put_dec((u64)up);
    puts(" vcpus checked in\n");
    exit_guest(0);
}
