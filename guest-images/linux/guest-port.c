/* guest-port: lets the Linux guest's init reach bulkhead's guest ports, which busybox can not
 * (it has no outb).
 *   guest-port boot-complete   write to port 0xf5: bulkhead logs the time since it started
 *   guest-port exit N          write N to port 0xf4: the VM ends, bulkhead exits with N
 * Needs root (ioperm). Exits 1 if the port can not be reached; for `exit` that means the VMM
 * did not end the VM, so the caller should fall back to another way out. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>

#define GUEST_EXIT_PORT 0xf4
#define BOOT_COMPLETE_PORT 0xf5

static int write_port(unsigned short port, unsigned char value) {
    if (ioperm(port, 1, 1) != 0) {
        perror("guest-port: ioperm");
        return 1;
    }
    outb(value, port);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "boot-complete") == 0) {
        return write_port(BOOT_COMPLETE_PORT, 1);
    }
    if (argc == 3 && strcmp(argv[1], "exit") == 0) {
        char *end;
        long status = strtol(argv[2], &end, 10);
        if (*argv[2] == '\0' || *end != '\0' || status < 0 || status > 255) {
            fprintf(stderr, "guest-port: exit status must be 0-255, not %s\n", argv[2]);
            return 2;
        }
        if (write_port(GUEST_EXIT_PORT, (unsigned char)status) != 0) return 1;
        /* A VMM without the exit port carries on; report that to the caller. */
        return 1;
    }
    fprintf(stderr, "usage: guest-port boot-complete | guest-port exit N\n");
    return 2;
}
