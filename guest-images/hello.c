/* hello: reports boot complete, prints a line saying how it was booted, checks the initrd if
 * one was given, and exits with the status given as `exit=N` on the command line (0 when
 * absent). Built three ways: a plain ELF (64-bit entry), an ELF with a PVH note, a bzImage. */
#include "lib/rt.h"

/* An initrd handed to hello must start with this line. */
static const char INITRD_MAGIC[] = "BULKHEAD-INITRD\n";

static void report_boot(void) {
    if (boot_pvh_info) {
        int ok = *(const u32 *)boot_pvh_info == PVH_MAGIC;
        puts(ok ? "boot protocol: pvh\n" : "boot protocol: pvh, bad start_info magic\n");
    } else if (boot_zero_page[BP_SETUP_SECTS] != 0) {
        puts("boot protocol: linux 64-bit from a bzImage\n");
    } else {
        puts("boot protocol: linux 64-bit\n");
    }
}

static void report_initrd(void) {
    u64 addr, size;
    if (!initrd(&addr, &size)) return;
    const char *p = (const char *)addr;
    int ok = size >= sizeof(INITRD_MAGIC) - 1;
    for (unsigned i = 0; ok && i < sizeof(INITRD_MAGIC) - 1; i++) ok = p[i] == INITRD_MAGIC[i];
    puts("initrd: ");
    put_dec(size);
    puts(ok ? " bytes, magic ok\n" : " bytes, magic missing\n");
}

void guest_main(void) {
    boot_complete();
    puts("hello from the bulkhead test guest\n");
    report_boot();
    report_initrd();
    exit_guest((u8)cmdline_u64("exit", 0));
}
