/* virtiofs_flood: a hostile driver of a virtio-fs share (not an alert rule: the bad-input
 * test for `--share`).
 *
 * Brings the share's device up as a driver would, and sends one well-formed FUSE_INIT, which
 * the share's virtiofsd answers. Then it sends what a hostile guest would: a request of an
 * unknown opcode, a header whose length claims more than the chain holds, a descriptor far
 * outside RAM, and for `flood_ms` (default 500) of wall time the same chain posted again and
 * again with a notification each time. Every wait is bounded.
 * Expected: the INIT is answered, the VM ends with this guest's own status 0, and nothing on
 * the host hangs or dies: the FUSE requests are the backend's to refuse, in its sandbox.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

#define ID_FS 26
#define FUSE_INIT 26

struct fuse_in_header {
    u32 len;
    u32 opcode;
    u64 unique;
    u64 nodeid;
    u32 uid;
    u32 gid;
    u32 pid;
    u16 total_extlen;
    u16 padding;
} __attribute__((packed));

struct fuse_init_in {
    u32 major;
    u32 minor;
    u32 max_readahead;
    u32 flags;
} __attribute__((packed));

struct fuse_out_header {
    u32 len;
    u32 error;
    u64 unique;
} __attribute__((packed));

static struct vq qs[2] __attribute__((aligned(4096)));
static struct {
    struct fuse_in_header h;
    struct fuse_init_in init;
} req __attribute__((aligned(64)));
static struct {
    struct fuse_out_header h;
    u8 body[256];
} out __attribute__((aligned(64)));

/* Posts `in` (readable) then `out` (writable) as one chain on the request queue, waits, and
 * prints what came back. */
static void send(struct vdev *d, const char *what, u64 in_addr, u32 in_len) {
    struct vq *q = &qs[1];
    memset(&out, 0xff, sizeof out);
    set_desc(q->desc, 0, in_addr, in_len, F_NEXT, 1);
    set_desc(q->desc, 1, (u64)&out, sizeof out, F_WRITE, 0);
    vq_post(d, 1, q, 0);
    u32 len = vq_wait_used(d, q, 0);
    puts("attack: ");
    puts(what);
    if (len == NO_ANSWER) {
        puts(" no answer\n");
        return;
    }
    puts(" used ");
    put_dec(len);
    puts(" error ");
    put_dec(0u - out.h.error);
    putc('\n');
}

void guest_main(void) {
    struct vdev d;
    attack_begin("virtiofs_flood");
    if (!vdev_open(&d, ID_FS, 0, qs, 2)) exit_guest(1);

    memset(&req, 0, sizeof req);
    req.h.len = sizeof req;
    req.h.opcode = FUSE_INIT;
    req.h.unique = 1;
    req.init.major = 7;
    req.init.minor = 31;
    req.init.max_readahead = 65536;
    send(&d, "fuse init", (u64)&req, sizeof req);

    req.h.opcode = 9999;
    req.h.unique = 2;
    send(&d, "unknown opcode", (u64)&req, sizeof req);

    req.h.opcode = FUSE_INIT;
    req.h.unique = 3;
    req.h.len = 1u << 20;
    send(&d, "header longer than its chain", (u64)&req, sizeof req);

    send(&d, "descriptor outside ram", 0xfff00000000ULL, sizeof req);

    /* The flood: the same chain, posted and notified as fast as the guest can, for a time. */
    u64 posted = 0;
    u64 deadline = deadline_after_ms(cmdline_u64("flood_ms", 500));
    struct vq *q = &qs[1];
    while (!past(deadline)) {
        vq_post(&d, 1, q, 0);
        vdev_write(&d, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        posted++;
    }
    puts("attack: flooded ");
    put_dec(posted);
    puts(" requests\n");
    vdev_report_and_exit(&d);
}
