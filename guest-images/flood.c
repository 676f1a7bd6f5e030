/* flood: one vCPU floods a virtio queue while the other works.
 *
 * The BSP sets up the flooded device's queue (256 entries) with one request: on virtio-rng
 * (flood=rng, the default) 4 KiB of random bytes, on the first disk (flood=blk) a 2 MiB read
 * from sector 0. It then starts the AP (flood_ap.S), which keeps that queue full for ever. The
 * BSP meanwhile does what the command line asks:
 *   work=exit (default): waits until the device has used `chains` chains (200), so the flood is
 *     surely on, then writes the guest-exit port with status 0. The VM must end at once: a
 *     device that serves a queue for as long as the guest keeps posting never lets the VMM
 *     thread see the exit request.
 *   work=blk: reads blk_mib MiB (default 64) from the first disk in 64 KiB requests, one at
 *     a time, then exits 0 (1 when a request failed or went unanswered).
 * mark=K times the work after the first K requests or chains by the guest's clock and reports
 * it ("flood: after the mark U units in T ns").
 * flood=none leaves the AP halted, and flood=spin has it spin without touching a device, for
 * comparison. flood=rng-bsp floods from the BSP instead: it fills the rng queue before each
 * disk request, so one busy vCPU floods and the host's two CPUs are not overcommitted.
 */
#include "lib/rt.h"
#include "attacks/lib/virtq.h"

#define AP_APIC_ID 1ULL
#define EXIT_AFTER_CHAINS 200u
#define BLK_REQUEST (64u << 10)

extern u8 flood_ap_start[], flood_ap_end[];
extern u64 flood_params_offset;

/* What flood_ap.S reads at `params`. */
struct ap_params {
    u32 avail;
    u32 used;
    u32 notify;
    u32 queue;
    u32 running;
    u32 cr3;
} __attribute__((packed));

/* The flooded queue is as large as bulkhead allows, so that the device always finds work
 * even when the AP is briefly off its CPU. */
#define FLOOD_QSIZE 256
struct bigvq {
    struct desc desc[FLOOD_QSIZE] __attribute__((aligned(16)));
    struct {
        u16 flags;
        u16 idx;
        u16 ring[FLOOD_QSIZE];
        u16 used_event;
    } __attribute__((packed)) avail __attribute__((aligned(16)));
    struct {
        u16 flags;
        u16 idx;
        struct {
            u32 id;
            u32 len;
        } __attribute__((packed)) ring[FLOOD_QSIZE];
        u16 avail_event;
    } __attribute__((packed)) used __attribute__((aligned(4096)));
};
static struct bigvq floodq __attribute__((aligned(4096)));
static struct vq blkq __attribute__((aligned(4096)));
#define FLOOD_READ (2u << 20)
static u8 flood_buf[FLOOD_READ] __attribute__((aligned(4096)));
static struct {
    u32 type;
    u32 reserved;
    u64 sector;
} __attribute__((packed)) flood_header;
static u8 flood_status;
static struct {
    u32 type;
    u32 reserved;
    u64 sector;
} __attribute__((packed)) blk_header;
static u8 blk_data[BLK_REQUEST] __attribute__((aligned(4096)));
static u8 blk_status;

static void fail(const char *why) {
    puts("flood: FAIL: ");
    puts(why);
    puts("\n");
    exit_guest(1);
}

static void delay(u64 loops) {
    for (volatile u64 i = 0; i < loops; i++) {
    }
}

/* Sets up queue 0 of device `id` on floodq, and starts the device. */
static void open_flooded(struct vdev *d, u32 id) {
    if (!vdev_begin(d, id, 0)) fail("the device to flood is missing");
    vdev_write(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    vdev_write(d, VIRTIO_MMIO_QUEUE_NUM, FLOOD_QSIZE);
    vdev_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)floodq.desc);
    vdev_write(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(u64)&floodq.avail);
    vdev_write(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(u64)&floodq.used);
    vdev_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (!vdev_driver_ok(d)) fail("the device to flood did not start");
}

/* Starts the flood from the AP: on virtio-rng (4 KiB of random bytes per chain), or on the
 * first disk (a 2 MiB read from sector 0 per chain). Returns once the AP runs it. */
static u64 flood_notify;

/* Fills every free slot of the flooded queue with descriptor 0 and notifies unless the device
 * is draining: what flood_ap.S does, once. */
static void top_up_flood(void) {
    while ((u16)(floodq.avail.idx - *(volatile u16 *)&floodq.used.idx) < FLOOD_QSIZE) {
        floodq.avail.ring[floodq.avail.idx % FLOOD_QSIZE] = 0;
        barrier();
        floodq.avail.idx++;
    }
    __asm__ volatile("mfence" ::: "memory");
    if (!(*(volatile u16 *)&floodq.used.flags & 1)) mmio_write32(flood_notify, 0);
}

static void start_flood(int blk, int spin, int use_ap) {
    struct vdev d;
    d.base = 0;
    if (spin) {
        /* No device: the AP only keeps its CPU busy, as the flood does. */
    } else if (blk) {
        open_flooded(&d, ID_BLOCK);
        flood_header.type = BLK_T_IN;
        flood_header.sector = 0;
        set_desc(floodq.desc, 0, (u64)&flood_header, sizeof(flood_header), F_NEXT, 1);
        /* Two 1 MiB segments (the device's largest): one request is more than one wakeup
         * of the device may move. */
        set_desc(floodq.desc, 1, (u64)flood_buf, FLOOD_READ / 2, F_NEXT | F_WRITE, 2);
        set_desc(floodq.desc, 2, (u64)flood_buf + FLOOD_READ / 2, FLOOD_READ / 2, F_NEXT | F_WRITE, 3);
        set_desc(floodq.desc, 3, (u64)&flood_status, 1, F_WRITE, 0);
    } else {
        open_flooded(&d, ID_RNG);
        set_desc(floodq.desc, 0, (u64)flood_buf, 4096, F_WRITE, 0);
    }
    flood_notify = d.base + VIRTIO_MMIO_QUEUE_NOTIFY;
    if (!use_ap) {
        puts("flood: the BSP floods virtio-rng between its disk requests\n");
        return;
    }
    memcpy((void *)TRAMPOLINE, flood_ap_start, (u64)(flood_ap_end - flood_ap_start));
    volatile struct ap_params *p = (volatile struct ap_params *)(TRAMPOLINE + flood_params_offset);
    p->avail = (u32)(u64)&floodq.avail;
    p->used = (u32)(u64)&floodq.used;
    p->notify = (u32)(d.base + VIRTIO_MMIO_QUEUE_NOTIFY);
    p->queue = spin ? 0xffffffffu : 0;
    p->running = 0;
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    if (cr3 >> 32) fail("the page tables lie above 4 GiB");
    p->cr3 = (u32)cr3;
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_EN | APIC_BASE_EXTD);
    wrmsr(MSR_X2APIC_ICR, (AP_APIC_ID << 32) | ICR_INIT);
    delay(100);
    for (int attempt = 0; attempt < 2 && !p->running; attempt++) {
        wrmsr(MSR_X2APIC_ICR, (AP_APIC_ID << 32) | ICR_STARTUP | SIPI_VECTOR);
        for (u64 until = deadline_after_ms(WAIT_LIMIT_MS); !p->running && !past(until);) {
        }
    }
    if (!p->running) fail("the AP did not start");
    puts(spin ? "flood: the AP spins\n" : blk ? "flood: the AP floods virtio-blk\n" : "flood: the AP floods virtio-rng\n");
}

/* `mark=K`: the work after the first K units (requests or chains) is timed by the guest's own
 * clock and reported, so a test measures a rate limit without the VM's start-up and end. */
static u64 mark_units, mark_ns;

static void reached(u64 units) {
    if (mark_units && !mark_ns && units >= mark_units) mark_ns = now_ns();
}

static void report_mark(u64 units) {
    if (!mark_ns) return;
    u64 ns = now_ns() - mark_ns;
    puts("flood: after the mark ");
    put_dec(units - mark_units);
    puts(" units in ");
    put_dec(ns);
    puts(" ns\n");
}

/* Counts the chains the flooded device uses until there are `n` more. */
static void wait_for_chains(u32 n) {
    u16 last = *(volatile u16 *)&floodq.used.idx;
    u32 seen = 0;
    while (seen < n) {
        u16 now = *(volatile u16 *)&floodq.used.idx;
        seen += (u16)(now - last);
        last = now;
        reached(seen);
    }
    report_mark(seen);
    puts("flood: the device used ");
    put_dec(seen);
    puts(" chains\n");
}

/* The disk the tests give holds its own byte offset in every 32-bit word: the reads, done by
 * the device in pieces, must have put each byte where it belongs. */
static void check_flood_data(void) {
    const volatile u32 *words = (const volatile u32 *)flood_buf;
    for (u32 i = 0; i < FLOOD_READ / 4; i++) {
        if (words[i] != i * 4) {
            puts("flood: data WRONG at byte ");
            put_dec(i * 4);
            putc('\n');
            exit_guest(1);
        }
    }
    puts("flood: the 2 MiB read holds the right bytes\n");
}

static void read_disk(u64 mib, int flood_here) {
    struct vdev blk;
    if (!vdev_open(&blk, ID_BLOCK, 0, &blkq, 1)) fail("no virtio-blk");
    u64 capacity = mmio_read32(blk.base + VIRTIO_MMIO_CONFIG) |
                   ((u64)mmio_read32(blk.base + VIRTIO_MMIO_CONFIG + 4) << 32);
    const u64 per = BLK_REQUEST / 512;
    if (capacity < per) fail("the disk is smaller than one request");
    set_desc(blkq.desc, 0, (u64)&blk_header, sizeof(blk_header), F_NEXT, 1);
    set_desc(blkq.desc, 1, (u64)blk_data, BLK_REQUEST, F_NEXT | F_WRITE, 2);
    set_desc(blkq.desc, 2, (u64)&blk_status, 1, F_WRITE, 0);
    u64 requests = mib * (1024 * 1024 / BLK_REQUEST);
    u64 slots = capacity / per;
    for (u64 i = 0; i < requests; i++) {
        blk_header.type = BLK_T_IN;
        blk_header.sector = (i % slots) * per;
        blk_status = 0xff;
        if (flood_here) top_up_flood();
        vq_post(&blk, 0, &blkq, 0);
        u32 len = vq_wait_used(&blk, &blkq, 0);
        if (len == NO_ANSWER) fail("a disk request went unanswered");
        if (blk_status != BLK_S_OK) fail("a disk request failed");
        reached(i + 1);
    }
    report_mark(requests);
    puts("flood: read ");
    put_dec(mib);
    puts(" MiB\n");
}

void guest_main(void) {
    int len;
    const char *flood = cmdline_value("flood", &len);
    int flooding = !(flood && str_eq(flood, len, "none"));
    int flood_blk = flood && str_eq(flood, len, "blk");
    int spin = flood && str_eq(flood, len, "spin");
    int on_bsp = flood && str_eq(flood, len, "rng-bsp");
    const char *work = cmdline_value("work", &len);
    int blk = work && str_eq(work, len, "blk");
    boot_complete();
    mark_units = cmdline_u64("mark", 0);
    if (flooding) start_flood(flood_blk, spin, !on_bsp);
    if (blk) {
        read_disk(cmdline_u64("blk_mib", 64), on_bsp);
    } else if (flooding && !spin) {
        wait_for_chains((u32)cmdline_u64("chains", EXIT_AFTER_CHAINS));
        if (flood_blk) check_flood_data();
    }
    puts("flood: exiting\n");
    exit_guest(0);
}
