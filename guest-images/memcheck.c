/* memcheck: proves the guest's RAM starts zeroed and is its own to use.
 *
 * Walks every RAM entry of the e820 map. Pages holding what bulkhead documents it writes
 * (boot tables, command line, MP table) and this guest's own image are skipped; every other
 * page is sampled at its first, middle and last qword (sweeping every byte takes minutes
 * under instruction emulation). All samples must read zero. Then each sample gets a pattern
 * unique to its address, and all are read back. Exits 0 on success, 1 on any mismatch.
 */
#include "lib/rt.h"

extern u8 __image_start[], __image_end[];

#define PAGE 4096ULL
#define LOW_MEM_END 0x100000ULL

/* Pages below 1 MiB that bulkhead fills: GDT/IDT, PVH info and zero page, boot stack, page
 * tables, command line, MP table. Everything else there must be zero too. */
static int vmm_page(u64 addr) {
    return addr == 0x0 || (addr >= 0x6000 && addr < 0xf000) || addr == 0x20000 ||
           (addr >= 0x9e000 && addr < 0xa0000);
}

static int skipped(u64 page) {
    if (page >= (u64)__image_start && page < (u64)__image_end) return 1;
    return page < LOW_MEM_END && vmm_page(page);
}

static u64 pattern(u64 addr) { return addr ^ 0x5a5aa5a5c3c33c3cULL; }

typedef int (*visit_fn)(u64 addr);

static u64 walk(const u8 *zero_page, visit_fn visit, u64 *bad) {
    u8 n = zero_page[BP_E820_ENTRIES];
    const struct e820_entry *map = (const struct e820_entry *)(zero_page + BP_E820_TABLE);
    u64 pages = 0;
    for (u8 i = 0; i < n; i++) {
        if (map[i].type != E820_RAM) continue;
        u64 start = (map[i].addr + PAGE - 1) & ~(PAGE - 1);
        u64 end = (map[i].addr + map[i].size) & ~(PAGE - 1);
        for (u64 page = start; page < end; page += PAGE) {
            if (skipped(page)) continue;
            pages++;
            if (!visit(page) || !visit(page + PAGE / 2) || !visit(page + PAGE - 8)) {
                *bad = page;
                return pages;
            }
        }
    }
    return pages;
}

static int is_zero(u64 addr) { return *(volatile u64 *)addr == 0; }
static int fill(u64 addr) { *(volatile u64 *)addr = pattern(addr); return 1; }
static int holds_pattern(u64 addr) { return *(volatile u64 *)addr == pattern(addr); }

void guest_main(void) {
    const u8 *zero_page = boot_zero_page;
    if (!zero_page) {
        puts("memcheck: FAIL: needs the Linux boot protocol's e820 map\n");
        exit_guest(1);
    }
    u64 bad = ~0ULL;
    u64 pages = walk(zero_page, is_zero, &bad);
    if (bad != ~0ULL) {
        puts("memcheck: FAIL: page ");
        put_hex(bad);
        puts(" was not zero at boot\n");
        exit_guest(1);
    }
    walk(zero_page, fill, &bad);
    walk(zero_page, holds_pattern, &bad);
    if (bad != ~0ULL) {
        puts("memcheck: FAIL: page ");
        put_hex(bad);
        puts(" did not keep what was written\n");
        exit_guest(1);
    }
    puts("memcheck: ");
    put_dec(pages);
    puts(" pages zero at boot and writable\n");
    exit_guest(0);
}
