/* virtio: drives bulkhead's virtio-mmio devices through their registers, as a driver would,
 * and as a hostile one would.
 *
 * Devices are found in the DSDT (or, without ACPI, the virtio_mmio.device= entries on the
 * command line). Every request is polled to completion (no interrupt handler), and the
 * InterruptStatus register must show the used-buffer interrupt afterwards.
 *
 *   mode=rng       read random bytes: a small request is filled, a large one is cut at the
 *                  device's 4 KiB cap
 *   mode=blk       get-id (must equal expect_id=), read sectors the host filled (sector n holds
 *                  byte n), write sectors 2-3 with 0xa5, flush, read them back; a request with
 *                  its header and data split over several buffers; a read past the end fails
 *   mode=blk-ro    the same disk attached read-only: a write fails with IOERR, reads work
 *   mode=blk-hostio  reads the last sector, then waits for a line on the console (meanwhile
 *                  the host shrinks the backing file) and reads it again: IOERR
 *   mode=tick      for snapshots: starts virtio-rng, then every period= ms (default 50) draws
 *                  16 random bytes and prints "tick N", ticks= times (default 40), then
 *                  "tick: done". Its output and status are the same whether or not it was
 *                  snapshotted and restored in between; a restored device that lost its queue
 *                  position stops answering, and the guest fails. With disk=1 each tick also
 *                  reads sector (N % 64) of the first disk into a page only the device writes
 *                  (what a diff snapshot must catch from the VMM's side)
 *   mode=hostile   every bad input the devices must refuse; each must be answered as the
 *                  device type allows, and the device must keep working (or ask for a reset
 *                  and work after it)
 * With clean=1, the blk, net and vsock modes leave out the requests they make on purpose to be
 * refused, and drive their device only as an honest driver would.
 * Exits 0 when every check passed, 1 otherwise.
 */
#include "lib/rt.h"
#include "lib/acpi.h"
#include "lib/virtio.h"


struct dev {
    u64 base;
    u32 id;
    struct vq *q;  /* queue 0 */
    struct vq *q1; /* queue 1, for devices that have one (net, vsock: transmit) */
    struct vq *q2; /* queue 2 (vsock: events) */
};

static struct vq queues[5] __attribute__((aligned(4096)));
/* Request memory: headers, data, status bytes and indirect tables, away from the rings. */
static u8 header[64] __attribute__((aligned(16)));
static u8 data[16384] __attribute__((aligned(4096)));
static u8 status[16];
static struct desc indirect[QSIZE] __attribute__((aligned(16)));
static int failures;
/* clean=1: no request meant to be refused. */
static int clean;

#define barrier() __asm__ volatile("" ::: "memory")

static u32 rd(struct dev *d, u32 reg) { return mmio_read32(d->base + reg); }
static void wr(struct dev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }

static void check(int ok, const char *what) {
    puts(ok ? "ok: " : "FAIL: ");
    puts(what);
    putc('\n');
    if (!ok) failures++;
}

static void setup_queue(struct dev *d, u32 index, struct vq *q) {
    memset(q, 0, sizeof(*q));
    wr(d, VIRTIO_MMIO_QUEUE_SEL, index);
    wr(d, VIRTIO_MMIO_QUEUE_NUM, QSIZE);
    wr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
    wr(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    wr(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(u64)&q->avail);
    wr(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
    wr(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(u64)&q->used);
    wr(d, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
    wr(d, VIRTIO_MMIO_QUEUE_READY, 1);
}

/* Resets the device and brings it up with `features` (VERSION_1 is added). */
static int init_device(struct dev *d, u64 features) {
    if (!virtio_negotiate(d->base, features)) return 0;
    setup_queue(d, 0, d->q);
    if (d->q1) setup_queue(d, 1, d->q1);
    if (d->q2) setup_queue(d, 2, d->q2);
    wr(d, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return rd(d, VIRTIO_MMIO_STATUS) == (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

static int open_device(struct dev *d, u32 id, struct vq *q, u64 features) {
    d->id = id;
    d->q = q;
    d->q1 = 0;
    d->q2 = 0;
    d->base = virtio_mmio_find(id);
    if (!d->base) {
        puts("no such device\n");
        return 0;
    }
    return init_device(d, features);
}

/* Makes chain `head` of queue `index` available and notifies. */
static void post(struct dev *d, u32 index, struct vq *q, u16 head) {
    q->avail.ring[q->avail.idx % QSIZE] = head;
    barrier();
    q->avail.idx++;
    barrier();
    wr(d, VIRTIO_MMIO_QUEUE_NOTIFY, index);
}

/* Waits for the device to use one entry of `q`. Returns the used length, or NO_ANSWER when
 * nothing was used in time. */
static u32 wait_used(struct dev *d, struct vq *q, u16 head) {
    for (u64 until = deadline_after_ms(WAIT_LIMIT_MS); !past(until);) {
        barrier();
        if (*(volatile u16 *)&q->used.idx != q->last_used) {
            u32 len = q->used.ring[q->last_used % QSIZE].len;
            u32 id = q->used.ring[q->last_used % QSIZE].id;
            q->last_used++;
            /* The device raises the interrupt after it finishes the batch, so wait for it. */
            u32 isr = 0;
            for (u64 w = deadline_after_ms(WAIT_LIMIT_MS); !(isr & 1) && !past(w);)
                isr = rd(d, VIRTIO_MMIO_INTERRUPT_STATUS);
            wr(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
            if (!(isr & 1)) check(0, "used-buffer interrupt raised");
            if (id != head) check(0, "used entry names the chain's head");
            return len;
        }
        __asm__ volatile("pause");
    }
    return NO_ANSWER;
}

static u32 submit(struct dev *d, u16 head) {
    post(d, 0, d->q, head);
    return wait_used(d, d->q, head);
}

static void set_desc(struct desc *t, u16 i, void *addr, u32 len, u16 flags, u16 next) {
    t[i].addr = (u64)addr;
    t[i].len = len;
    t[i].flags = flags;
    t[i].next = next;
}

/* ---- rng ---- */

static u32 rng_read(struct dev *d, u32 len) {
    memset(data, 0, sizeof(data));
    set_desc(d->q->desc, 0, data, len, F_WRITE, 0);
    return submit(d, 0);
}

static int all_zero(const u8 *p, u32 n) {
    for (u32 i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

static void test_rng(void) {
    struct dev d;
    check(open_device(&d, ID_RNG, &queues[0], 0), "rng: device initialised");
    if (failures) return;
    check(rng_read(&d, 64) == 64 && !all_zero(data, 64), "rng: 64 random bytes");
    u32 n = rng_read(&d, 8192);
    check(n == 4096 && !all_zero(data + 4032, 64) && all_zero(data + 4096, 4096),
          "rng: an 8 KiB request is cut at 4 KiB");
}

/* ---- blk ---- */

static void blk_header(u32 type, u64 sector) {
    memset(header, 0, 16);
    *(u32 *)header = type;
    *(u64 *)(header + 8) = sector;
}

/* One request: header, optional data (readable for OUT, writable otherwise), status.
 * Returns the status byte, or 0xff when the device did not answer as expected. */
static u8 blk_request(struct dev *d, u32 type, u64 sector, void *buf, u32 len, u32 *used) {
    struct desc *t = d->q->desc;
    blk_header(type, sector);
    status[0] = 0xee;
    u16 data_flags = type == BLK_T_OUT ? 0 : F_WRITE;
    if (len) {
        set_desc(t, 0, header, 16, F_NEXT, 1);
        set_desc(t, 1, buf, len, data_flags | F_NEXT, 2);
        set_desc(t, 2, status, 1, F_WRITE, 0);
    } else {
        set_desc(t, 0, header, 16, F_NEXT, 2);
        set_desc(t, 2, status, 1, F_WRITE, 0);
    }
    u32 n = submit(d, 0);
    if (used) *used = n;
    return n == NO_ANSWER ? 0xff : status[0];
}

static u64 blk_capacity(struct dev *d) {
    return (u64)rd(d, VIRTIO_MMIO_CONFIG) | ((u64)rd(d, VIRTIO_MMIO_CONFIG + 4) << 32);
}

static int sectors_hold(u64 first, u32 count, const u8 *p) {
    for (u32 s = 0; s < count; s++)
        for (u32 i = 0; i < 512; i++)
            if (p[s * 512 + i] != (u8)(first + s)) return 0;
    return 1;
}

static void test_blk(int read_only) {
    struct dev d;
    u32 used;
    check(open_device(&d, ID_BLOCK, &queues[0], FEAT_BLK_FLUSH), "blk: device initialised");
    if (failures) return;
    u64 cap = blk_capacity(&d);
    puts("blk: capacity ");
    put_dec(cap);
    puts(" sectors\n");

    memset(data, 0, 32);
    u8 st = blk_request(&d, BLK_T_GET_ID, 0, data, 20, &used);
    int len;
    const char *want = cmdline_value("expect_id", &len);
    check(st == BLK_S_OK && want && str_eq(want, len, (const char *)data) && used == 21,
          "blk: get-id returns the disk's id");

    memset(data, 0xcc, 4096);
    st = blk_request(&d, BLK_T_IN, 0, data, 4096, &used);
    check(st == BLK_S_OK && used == 4097 && sectors_hold(0, 8, data),
          "blk: sectors 0-7 read as the host wrote them");

    /* Header in two pieces, data in three, status alone: still one request. */
    struct desc *t = d.q->desc;
    blk_header(BLK_T_IN, 4);
    status[0] = 0xee;
    memset(data, 0, 2048);
    set_desc(t, 0, header, 8, F_NEXT, 1);
    set_desc(t, 1, header + 8, 8, F_NEXT, 2);
    set_desc(t, 2, data, 100, F_WRITE | F_NEXT, 3);
    set_desc(t, 3, data + 100, 412, F_WRITE | F_NEXT, 4);
    set_desc(t, 4, data + 512, 512, F_WRITE | F_NEXT, 5);
    set_desc(t, 5, status, 1, F_WRITE, 0);
    used = submit(&d, 0);
    check(used == 1025 && status[0] == BLK_S_OK && sectors_hold(4, 2, data),
          "blk: a request split over many buffers is read as one");

    memset(data, 0xa5, 1024);
    st = blk_request(&d, BLK_T_OUT, 2, data, 1024, &used);
    if (read_only) {
        check(st == BLK_S_IOERR && used == 1, "blk-ro: a write is refused with IOERR");
    } else {
        check(st == BLK_S_OK && used == 1, "blk: sectors 2-3 written");
        st = blk_request(&d, BLK_T_FLUSH, 0, 0, 0, &used);
        check(st == BLK_S_OK && used == 1, "blk: flush");
        memset(data, 0, 1024);
        st = blk_request(&d, BLK_T_IN, 2, data, 1024, &used);
        check(st == BLK_S_OK && data[0] == 0xa5 && data[1023] == 0xa5, "blk: written sectors read back");
    }
    memset(data, 0, 512);
    if (!clean) {
        st = blk_request(&d, BLK_T_IN, cap, data, 512, &used);
        check(st == BLK_S_IOERR && used == 1, "blk: a read past the end fails with IOERR");
    }
    st = blk_request(&d, BLK_T_IN, cap - 1, data, 512, &used);
    check(st == BLK_S_OK, "blk: the last sector reads");
}

static void test_blk_hostio(void) {
    struct dev d;
    u32 used;
    check(open_device(&d, ID_BLOCK, &queues[0], 0), "blk: device initialised");
    if (failures) return;
    u64 cap = blk_capacity(&d);
    check(blk_request(&d, BLK_T_IN, cap - 1, data, 512, &used) == BLK_S_OK, "blk: the last sector reads");
    puts("blk: waiting for the host\n");
    while (serial_getc() != '\n') {
    }
    check(blk_request(&d, BLK_T_IN, cap - 1, data, 512, &used) == BLK_S_IOERR && used == 1,
          "blk: a read the host can not serve fails with IOERR");
    check(blk_request(&d, BLK_T_IN, 0, data, 512, &used) == BLK_S_OK, "blk: the first sector still reads");
}

/* ---- hostile ---- */

/* Submits the chain at `head` and expects it handed back unused (length 0) with the status
 * byte untouched. */
static void expect_refused_chain(struct dev *d, u16 head, const char *what) {
    status[0] = 0xee;
    u32 n = submit(d, head);
    check(n == 0 && status[0] == 0xee, what);
}

/* A valid read of sector 0 still works: the device survived. */
static void expect_alive(struct dev *d, const char *what) {
    u32 used;
    check(blk_request(d, BLK_T_IN, 0, data, 512, &used) == BLK_S_OK && used == 513, what);
}

static void hostile_chains(struct dev *blk, struct dev *rng) {
    struct desc *t = blk->q->desc;
    blk_header(BLK_T_IN, 0);

    set_desc(t, 0, header, 16, F_NEXT, 200);
    expect_refused_chain(blk, 0, "chain: a next index past the table");
    set_desc(t, 0, header, 16, F_NEXT, 1);
    set_desc(t, 1, data, 512, F_WRITE | F_NEXT, 0);
    expect_refused_chain(blk, 0, "chain: a loop");
    set_desc(t, 0, header, 0, F_NEXT, 1);
    set_desc(t, 1, status, 1, F_WRITE, 0);
    expect_refused_chain(blk, 0, "chain: a zero-length descriptor");
    set_desc(t, 0, (void *)0xc0000000ULL, 16, F_NEXT, 1);
    expect_refused_chain(blk, 0, "chain: a buffer outside guest RAM");
    set_desc(t, 0, header, 16, F_NEXT, 1);
    set_desc(t, 1, (void *)&blk->q->used, 512, F_WRITE | F_NEXT, 2);
    set_desc(t, 2, status, 1, F_WRITE, 0);
    expect_refused_chain(blk, 0, "chain: a buffer over the used ring");
    set_desc(t, 0, status, 1, F_WRITE | F_NEXT, 1);
    set_desc(t, 1, header, 16, F_NEXT, 2);
    set_desc(t, 2, status + 1, 1, F_WRITE, 0);
    expect_refused_chain(blk, 0, "chain: a readable buffer after a writable one");

    set_desc(indirect, 0, header, 16, F_NEXT, 1);
    set_desc(indirect, 1, status, 1, F_WRITE, 0);
    set_desc(t, 0, indirect, 2 * 16, F_INDIRECT | F_NEXT, 1);
    expect_refused_chain(blk, 0, "chain: INDIRECT with NEXT");
    set_desc(t, 0, indirect, 24, F_INDIRECT, 0);
    expect_refused_chain(blk, 0, "chain: an indirect table of 1.5 descriptors");
    set_desc(indirect, 0, indirect + 4, 32, F_INDIRECT, 0);
    set_desc(t, 0, indirect, 16, F_INDIRECT, 0);
    expect_refused_chain(blk, 0, "chain: an indirect table inside an indirect table");
    /* One direct descriptor, then an indirect table of QSIZE: more buffers than the queue
     * size, which no chain may have. */
    for (u16 i = 0; i < QSIZE; i++) set_desc(indirect, i, header, 16, F_NEXT, (u16)(i + 1));
    indirect[QSIZE - 1].flags = 0;
    set_desc(t, 0, header, 16, F_NEXT, 1);
    set_desc(t, 1, indirect, QSIZE * 16, F_INDIRECT, 0);
    expect_refused_chain(blk, 0, "chain: more descriptors than the queue size");
    /* A well-formed indirect request works. */
    set_desc(indirect, 0, header, 16, F_NEXT, 1);
    set_desc(indirect, 1, data, 512, F_WRITE | F_NEXT, 2);
    set_desc(indirect, 2, status, 1, F_WRITE, 0);
    set_desc(t, 0, indirect, 3 * 16, F_INDIRECT, 0);
    status[0] = 0xee;
    check(submit(blk, 0) == 513 && status[0] == BLK_S_OK, "chain: a good indirect request works");

    /* A head index past the table can not be handed back: nothing is used for it, and the
     * next request is answered first. */
    struct vq *q = blk->q;
    q->avail.ring[q->avail.idx % QSIZE] = 300;
    barrier();
    q->avail.idx++;
    expect_alive(blk, "chain: a head index past the table is dropped, the next request works");
    check(q->used.idx == q->last_used, "chain: nothing was used for the bad head");

    struct desc *r = rng->q->desc;
    set_desc(r, 0, indirect, 16, F_INDIRECT, 0);
    set_desc(indirect, 0, data, 64, F_WRITE, 0);
    expect_refused_chain(rng, 0, "chain: indirect when the device did not offer it");
    set_desc(r, 0, data, 8192, F_WRITE | F_NEXT, 1);
    set_desc(r, 1, (void *)0x800000ULL, 0x100000, F_WRITE, 0);
    expect_refused_chain(rng, 0, "chain: buffers longer than the device accepts");
}

static void hostile_requests(struct dev *blk, struct dev *rng) {
    u32 used;
    u64 cap = blk_capacity(blk);
    struct desc *t = blk->q->desc;

    check(blk_request(blk, 99, 0, 0, 0, &used) == BLK_S_UNSUPP, "request: an unknown type is UNSUPP");
    check(blk_request(blk, BLK_T_IN, cap - 1, data, 1024, &used) == BLK_S_IOERR,
          "request: a read running past the end is IOERR");
    check(blk_request(blk, BLK_T_IN, 0xffffffffffffffffULL, data, 512, &used) == BLK_S_IOERR,
          "request: a sector number that overflows is IOERR");
    check(blk_request(blk, BLK_T_IN, 0, data, 100, &used) == BLK_S_IOERR,
          "request: a read of part of a sector is IOERR");
    set_desc(t, 0, header, 8, F_NEXT, 1);
    set_desc(t, 1, status, 1, F_WRITE, 0);
    status[0] = 0xee;
    check(submit(blk, 0) == 1 && status[0] == BLK_S_IOERR, "request: a short header is IOERR");
    blk_header(BLK_T_IN, 0);
    set_desc(t, 0, header, 16, 0, 0);
    check(submit(blk, 0) == 0, "request: no status byte, nothing written");

    set_desc(rng->q->desc, 0, header, 16, 0, 0);
    check(submit(rng, 0) == 0, "request: a device-readable buffer for rng gets nothing");
    expect_alive(blk, "request: the block device still works");
}

static void hostile_transport(struct dev *blk) {
    u64 b = blk->base;
    /* A byte-wide read of a control register is refused (all-ones). */
    check(*(volatile u8 *)(b + VIRTIO_MMIO_STATUS) == 0xff, "transport: a byte read of Status is refused");
    wr(blk, VIRTIO_MMIO_MAGIC, 0);
    check(rd(blk, VIRTIO_MMIO_MAGIC) == 0x74726976, "transport: Magic is read-only");
    wr(blk, VIRTIO_MMIO_QUEUE_NUM, 8);
    wr(blk, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    wr(blk, VIRTIO_MMIO_QUEUE_SEL, 0);
    check(rd(blk, VIRTIO_MMIO_STATUS) == 0xf, "transport: queue and feature writes after DRIVER_OK are refused");
    wr(blk, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    expect_alive(blk, "transport: a notify for queue 7 is refused");

    wr(blk, VIRTIO_MMIO_STATUS, 0);
    wr(blk, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    check(rd(blk, VIRTIO_MMIO_STATUS) == 0, "transport: DRIVER_OK straight after reset is refused");
    wr(blk, VIRTIO_MMIO_STATUS, S_ACK);
    wr(blk, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER);
    wr(blk, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(blk, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    wr(blk, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    check(!(rd(blk, VIRTIO_MMIO_STATUS) & S_FEATURES_OK), "transport: features without VERSION_1 are refused");
    wr(blk, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(blk, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    check(rd(blk, VIRTIO_MMIO_STATUS) & S_FEATURES_OK, "transport: FEATURES_OK with VERSION_1");
    wr(blk, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    b += VIRTIO_MMIO_CONFIG;
    *(volatile u8 *)b = 1;
    wr(blk, VIRTIO_MMIO_QUEUE_SEL, 3);
    wr(blk, VIRTIO_MMIO_QUEUE_SEL, 0);
    wr(blk, VIRTIO_MMIO_QUEUE_NUM, 3);
    wr(blk, VIRTIO_MMIO_QUEUE_NUM, 512);
    check(rd(blk, VIRTIO_MMIO_QUEUE_NUM_MAX) == 256, "transport: queue 0 allows 256");
    wr(blk, VIRTIO_MMIO_QUEUE_NUM, QSIZE);
    wr(blk, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008);
    wr(blk, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
    wr(blk, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
    wr(blk, VIRTIO_MMIO_QUEUE_READY, 1);
    check(rd(blk, VIRTIO_MMIO_QUEUE_READY) == 0, "transport: a misaligned descriptor table is refused");
    wr(blk, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xc0000000u);
    wr(blk, VIRTIO_MMIO_QUEUE_READY, 1);
    check(rd(blk, VIRTIO_MMIO_QUEUE_READY) == 0, "transport: rings outside guest RAM are refused");
    /* A notify before DRIVER_OK goes nowhere. It reaches the VMM thread through the queue's
     * ioeventfd, with no exit to wait on and (under --on-violation log) nothing the guest can
     * see: the VMM counts it only if it looks before the device is live again. A quarter of a
     * second by the clock gives its thread that time on any host, however loaded (a count of
     * 2,000 register reads once was not enough on a busy CI machine). */
    wr(blk, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    wait_ms(250);
    /* DRIVER_OK with queue 0 never made ready: the device can not start. */
    wr(blk, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    check(rd(blk, VIRTIO_MMIO_STATUS) & S_NEEDS_RESET, "transport: DRIVER_OK without a ready queue needs a reset");
    check(init_device(blk, FEAT_INDIRECT), "transport: the device comes back after a reset");
    expect_alive(blk, "transport: and works");
}

static void hostile_avail_jump(struct dev *blk) {
    struct vq *q = blk->q;
    q->avail.idx += 100;
    barrier();
    wr(blk, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    u32 status_reg = 0;
    for (u64 until = deadline_after_ms(WAIT_LIMIT_MS); !(status_reg & S_NEEDS_RESET) && !past(until);)
        status_reg = rd(blk, VIRTIO_MMIO_STATUS);
    check(status_reg & S_NEEDS_RESET, "ring: an avail index jump sets NEEDS_RESET");
    check(rd(blk, VIRTIO_MMIO_INTERRUPT_STATUS) & 2, "ring: with a configuration interrupt");
    check(init_device(blk, FEAT_INDIRECT), "ring: the device comes back after a reset");
    expect_alive(blk, "ring: and works");
}

static void test_hostile(void) {
    struct dev blk, rng;
    check(open_device(&blk, ID_BLOCK, &queues[0], FEAT_INDIRECT), "hostile: blk initialised");
    check(open_device(&rng, ID_RNG, &queues[1], 0), "hostile: rng initialised");
    if (failures) return;
    hostile_chains(&blk, &rng);
    hostile_requests(&blk, &rng);
    hostile_transport(&blk);
    hostile_avail_jump(&blk);
}

/* ---- net ---- */

#define ETHERTYPE_TEST 0x88b5 /* IEEE local experimental */
static u8 rx_buf[2048];

/* Sends one frame from `src` (header `hdr_flags` in the virtio-net header's first byte) and
 * returns the used length. */
static u32 net_send_flags(struct dev *d, const u8 *src, u8 hdr_flags, const char *payload, u16 desc_flags) {
    u8 *f = data;
    memset(f, 0, 12 + 64);
    f[0] = hdr_flags;
    u8 *eth = f + 12;
    memset(eth, 0xff, 6); /* broadcast */
    memcpy(eth + 6, src, 6);
    eth[12] = ETHERTYPE_TEST >> 8;
    eth[13] = ETHERTYPE_TEST & 0xff;
    u32 n = 0;
    while (payload[n]) { eth[14 + n] = (u8)payload[n]; n++; }
    set_desc(d->q1->desc, 0, f, 12 + 14 + 46, desc_flags, 0);
    post(d, 1, d->q1, 0);
    return wait_used(d, d->q1, 0);
}

static u32 net_send(struct dev *d, const u8 *src, u8 hdr_flags, const char *payload) {
    return net_send_flags(d, src, hdr_flags, payload, 0);
}

static void test_net(void) {
    struct dev d;
    d.id = ID_NET;
    d.q = &queues[0];
    d.q1 = &queues[1];
    d.base = virtio_mmio_find(ID_NET);
    check(d.base && init_device(&d, 1ULL << 5), "net: device initialised");
    if (failures) return;
    u8 mac[6], other[6];
    for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(d.base + VIRTIO_MMIO_CONFIG + i);
    memcpy(other, mac, 6);
    other[5] ^= 1;
    puts("net: MAC ");
    for (int i = 0; i < 6; i++) { put_hex(mac[i]); putc(i < 5 ? ':' : '\n'); }

    if (!clean) {
        check(net_send(&d, other, 0, "bulkhead-net-spoofed") == 0,
              "net: a frame from another MAC is taken and dropped");
        check(net_send(&d, mac, 1, "bulkhead-net-bad-header") == 0,
              "net: a frame asking for checksum offload is taken and dropped");
        check(net_send_flags(&d, mac, 0, "bulkhead-net-writable", F_WRITE) == 0,
              "net: a transmit buffer the device could write is taken and dropped");
    }
    check(net_send(&d, mac, 0, "bulkhead-net-out") == 0, "net: a frame from the VM's MAC is sent");

    /* Receive until the host's answer arrives (other traffic may come first). */
    for (int tries = 0; tries < 64; tries++) {
        memset(rx_buf, 0, sizeof(rx_buf));
        set_desc(d.q->desc, 0, rx_buf, sizeof(rx_buf), F_WRITE, 0);
        post(&d, 0, d.q, 0);
        u32 n = NO_ANSWER;
        for (int wait = 0; wait < 20 && n == NO_ANSWER; wait++) n = wait_used(&d, d.q, 0);
        if (n == NO_ANSWER) break;
        u8 *eth = rx_buf + 12;
        if (n >= 12 + 14 + 15 && eth[12] == (ETHERTYPE_TEST >> 8) && eth[13] == (ETHERTYPE_TEST & 0xff)) {
            int to_us = 1;
            for (int i = 0; i < 6; i++) to_us &= eth[i] == mac[i];
            check(to_us && str_eq((const char *)eth + 14, 15, "bulkhead-net-in") && rx_buf[10] == 1,
                  "net: the host's frame arrived whole, with num_buffers 1");
            return;
        }
    }
    check(0, "net: the host's frame arrived");
}

/* ---- vsock ---- */

#define VS_HDR 44
#define VS_REQUEST 1
#define VS_RESPONSE 2
#define VS_RST 3
#define VS_SHUTDOWN 4
#define VS_RW 5
#define VS_RX_BUFS 4
#define VS_RX_SIZE 2048

struct vs_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static u8 vs_rx[VS_RX_BUFS][VS_RX_SIZE] __attribute__((aligned(16)));
static u8 vs_tx[VS_HDR + 256] __attribute__((aligned(16)));
static u64 vs_cid;
static u32 vs_fwd; /* payload bytes consumed from the host on the current connection */

static void vs_post_rx(struct dev *d, u16 i) {
    set_desc(d->q->desc, i, vs_rx[i], VS_RX_SIZE, F_WRITE, 0);
    struct vq *q = d->q;
    q->avail.ring[q->avail.idx % QSIZE] = i;
    barrier();
    q->avail.idx++;
    barrier();
    wr(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
}

/* Waits for the next received packet; copies it to `out` (header then payload) and re-posts
 * its buffer. Returns 0 when nothing came in time. */
static int vs_recv(struct dev *d, u8 *out) {
    struct vq *q = d->q;
    for (u64 until = deadline_after_ms(2 * WAIT_LIMIT_MS); !past(until);) {
        barrier();
        if (*(volatile u16 *)&q->used.idx != q->last_used) {
            u16 id = (u16)q->used.ring[q->last_used % QSIZE].id;
            u32 len = q->used.ring[q->last_used % QSIZE].len;
            q->last_used++;
            wr(d, VIRTIO_MMIO_INTERRUPT_ACK, rd(d, VIRTIO_MMIO_INTERRUPT_STATUS));
            if (id >= VS_RX_BUFS || len < VS_HDR) return 0;
            memcpy(out, vs_rx[id], len);
            vs_post_rx(d, id);
            return 1;
        }
        __asm__ volatile("pause");
    }
    return 0;
}

/* Sends a packet of `tx_len` bytes already in vs_tx; returns the used length. */
static u32 vs_send_raw(struct dev *d, u32 tx_len) {
    set_desc(d->q1->desc, 0, vs_tx, tx_len, 0, 0);
    post(d, 1, d->q1, 0);
    return wait_used(d, d->q1, 0);
}

static u32 vs_send(struct dev *d, u16 op, u32 src_port, u32 dst_port, const char *payload) {
    struct vs_hdr *h = (struct vs_hdr *)vs_tx;
    u32 n = 0;
    while (payload && payload[n]) { vs_tx[VS_HDR + n] = (u8)payload[n]; n++; }
    h->src_cid = vs_cid;
    h->dst_cid = 2;
    h->src_port = src_port;
    h->dst_port = dst_port;
    h->len = n;
    h->type = 1;
    h->op = op;
    h->flags = 0;
    h->buf_alloc = 65536;
    h->fwd_cnt = vs_fwd;
    return vs_send_raw(d, VS_HDR + n);
}

static u8 vs_pkt[VS_RX_SIZE];

/* Receives until a packet with op `op` arrives; returns its header, or 0. */
static struct vs_hdr *vs_expect(struct dev *d, u16 op) {
    for (int i = 0; i < 16; i++) {
        if (!vs_recv(d, vs_pkt)) return 0;
        struct vs_hdr *h = (struct vs_hdr *)vs_pkt;
        if (h->op == VS_RW) vs_fwd += h->len;
        if (h->op == op) return h;
    }
    return 0;
}

static int payload_is(struct vs_hdr *h, const char *want) {
    return h && str_eq((const char *)vs_pkt + VS_HDR, (int)h->len, want);
}

static void test_vsock(void) {
    struct dev d;
    d.id = ID_VSOCK;
    d.q = &queues[0];
    d.q1 = &queues[1];
    d.q2 = &queues[2];
    d.base = virtio_mmio_find(ID_VSOCK);
    check(d.base && init_device(&d, 0), "vsock: device initialised");
    if (failures) return;
    vs_cid = mmio_read64(d.base + VIRTIO_MMIO_CONFIG);
    puts("vsock: CID ");
    put_dec(vs_cid);
    putc('\n');
    for (u16 i = 0; i < VS_RX_BUFS; i++) vs_post_rx(&d, i);

    /* The host connects to our port 1234 and sends a line; we echo it. */
    struct vs_hdr *h = vs_expect(&d, VS_REQUEST);
    check(h && h->dst_port == 1234 && h->src_cid == 2 && h->dst_cid == vs_cid,
          "vsock: the host's CONNECT 1234 arrives as a request");
    if (!h) return;
    u32 host_port = h->src_port;
    vs_send(&d, VS_RESPONSE, 1234, host_port, 0);
    h = vs_expect(&d, VS_RW);
    check(payload_is(h, "ping-from-host"), "vsock: the host's data arrives");
    vs_send(&d, VS_RW, 1234, host_port, "ping-from-host");
    h = vs_expect(&d, VS_SHUTDOWN);
    check(h != 0, "vsock: the host's close arrives as a shutdown");

    /* We connect to host port 5000 and trade lines with the listener on uds_5000. Credit
     * counts are per connection. */
    vs_fwd = 0;
    vs_send(&d, VS_REQUEST, 4000, 5000, 0);
    h = vs_expect(&d, VS_RESPONSE);
    check(h && h->src_port == 5000 && h->dst_port == 4000, "vsock: the host's listener accepts");
    vs_send(&d, VS_RW, 4000, 5000, "ping-from-guest");
    h = vs_expect(&d, VS_RW);
    check(payload_is(h, "pong-from-host"), "vsock: the host's answer arrives");
    vs_send(&d, VS_RST, 4000, 5000, 0);

    /* A port nobody listens on is refused with a reset. */
    vs_send(&d, VS_REQUEST, 4001, 5999, 0);
    check(vs_expect(&d, VS_RST) != 0, "vsock: a connection to a closed host port is reset");
    if (clean) return;

    /* Hostile headers: each is taken (length 0) and dropped. */
    struct vs_hdr *t = (struct vs_hdr *)vs_tx;
    vs_send(&d, VS_REQUEST, 4002, 5000, 0);
    vs_expect(&d, VS_RESPONSE);
    t->src_cid = vs_cid + 1;
    check(vs_send_raw(&d, VS_HDR) == 0, "vsock: a packet from another CID is dropped");
    t->src_cid = vs_cid;
    t->dst_cid = 5;
    check(vs_send_raw(&d, VS_HDR) == 0, "vsock: a packet to another VM is dropped");
    t->dst_cid = 2;
    t->op = 9;
    check(vs_send_raw(&d, VS_HDR) == 0, "vsock: an unknown operation is dropped");
    t->op = VS_RW;
    t->len = 100;
    check(vs_send_raw(&d, VS_HDR + 10) == 0, "vsock: a length that disagrees with the payload is dropped");
    check(vs_send_raw(&d, 20) == 0, "vsock: a short header is dropped");
    vs_send(&d, VS_RST, 4002, 5000, 0);

    /* Host port 6000 is a listener that never accepts, so nothing drains the connection;
     * sending on regardless of credit must get the connection reset. */
    vs_fwd = 0;
    vs_send(&d, VS_REQUEST, 4003, 6000, 0);
    check(vs_expect(&d, VS_RESPONSE) != 0, "vsock: the silent listener's connection opens");
    struct vs_hdr *hd = (struct vs_hdr *)vs_tx;
    int reset = 0;
    for (int i = 0; i < 128 && !reset; i++) {
        hd->src_cid = vs_cid;
        hd->dst_cid = 2;
        hd->src_port = 4003;
        hd->dst_port = 6000;
        hd->len = sizeof(data);
        hd->type = 1;
        hd->op = VS_RW;
        hd->buf_alloc = 65536;
        hd->fwd_cnt = 0;
        set_desc(d.q1->desc, 0, vs_tx, VS_HDR, F_NEXT, 1);
        set_desc(d.q1->desc, 1, data, sizeof(data), 0, 0);
        post(&d, 1, d.q1, 0);
        wait_used(&d, d.q1, 0);
        /* Look for the reset without waiting: the device queues it as it refuses. */
        struct vq *rq = d.q;
        while (!reset && *(volatile u16 *)&rq->used.idx != rq->last_used) {
            vs_recv(&d, vs_pkt);
            struct vs_hdr *r = (struct vs_hdr *)vs_pkt;
            reset = r->op == VS_RST && r->dst_port == 4003;
        }
    }
    check(reset, "vsock: sending past the credit resets the connection");
}

/* Where tick mode's disk reads land: the guest itself never writes this page. */
static u8 tick_sector[512] __attribute__((aligned(4096)));

static void tick(void) {
    struct dev d, blk;
    check(open_device(&d, ID_RNG, &queues[0], 0), "rng: device initialised");
    int disk = cmdline_u64("disk", 0) != 0;
    if (disk) check(open_device(&blk, ID_BLOCK, &queues[1], 0), "blk: device initialised");
    if (failures) return;
    u64 ticks = cmdline_u64("ticks", 40), period = cmdline_u64("period", 50);
    u64 next = now_ns();
    for (u64 i = 0; i < ticks; i++) {
        /* Each tick a fresh chain: the ring's position moves with the guest's time. */
        u16 head = (u16)(i % QSIZE);
        memset(data, 0, 16);
        set_desc(d.q->desc, head, data, 16, F_WRITE, 0);
        if (submit(&d, head) != 16) {
            puts("tick: the rng did not answer\n");
            failures++;
            return;
        }
        if (disk && blk_request(&blk, BLK_T_IN, i % 64, tick_sector, 512, 0) != 0) {
            puts("tick: the disk did not answer\n");
            failures++;
            return;
        }
        puts("tick ");
        put_dec(i);
        putc('\n');
        next += period * 1000000ULL;
        while (now_ns() < next) __asm__ volatile("pause");
    }
    puts("tick: done\n");
}

/* Says where the devices are announced: the DSDT, and how many command-line entries. */
static void report_announcements(void) {
    static const char key[] = "virtio_mmio.device=";
    u64 entries = 0;
    for (const char *p = cmdline(); *p; p++) {
        const char *k = key, *t = p;
        while (*k && *t == *k) { t++; k++; }
        if (!*k) entries++;
    }
    puts(acpi_table("DSDT") ? "virtio: devices in the DSDT, " : "virtio: no DSDT, ");
    put_dec(entries);
    puts(" on the command line\n");
}

void guest_main(void) {
    int len;
    const char *mode = cmdline_value("mode", &len);
    clean = cmdline_u64("clean", 0) != 0;
    report_announcements();
    if (mode && str_eq(mode, len, "rng")) {
        test_rng();
    } else if (mode && str_eq(mode, len, "blk")) {
        test_blk(0);
    } else if (mode && str_eq(mode, len, "blk-hostio")) {
        test_blk_hostio();
    } else if (mode && str_eq(mode, len, "blk-ro")) {
        test_blk(1);
    } else if (mode && str_eq(mode, len, "vsock")) {
        test_vsock();
    } else if (mode && str_eq(mode, len, "net")) {
        test_net();
    } else if (mode && str_eq(mode, len, "tick")) {
        tick();
    } else if (mode && str_eq(mode, len, "hostile")) {
        test_hostile();
    } else {
        puts("virtio: unknown mode\n");
        exit_guest(2);
    }
    puts(failures ? "virtio: FAILED\n" : "virtio: all checks passed\n");
    exit_guest(failures ? 1 : 0);
}
