/* hello: reports boot complete, prints a line, and exits with the status given as `exit=N`
 * on the command line (0 when absent). */
#include "lib/rt.h"

void guest_main(const u8 *zero_page) {
    boot_complete();
    puts("hello from the bulkhead test guest\n");
    exit_guest((u8)cmdline_u64(zero_page, "exit", 0));
}
