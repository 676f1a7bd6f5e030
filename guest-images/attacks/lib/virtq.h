/* A minimal virtio-mmio (version 2) split-queue driver for the attack guests.
 *
 * Every helper here does exactly what a correct driver does, so that a guest built on it
 * trips only the one refusal its attack is about. Everything is polled (interrupts stay off)
 * and every wait is bounded: a guest never hangs, whatever the device does.
 */
#ifndef BULKHEAD_ATTACKS_VIRTQ_H
#define BULKHEAD_ATTACKS_VIRTQ_H

#include "../../lib/rt.h"

/* Registers (virtio 1.2, 4.2.2). */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MAGIC_VALUE 0x74726976u /* "virt" */

/* Device status bits. */
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

/* Descriptor flags. */
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

#define FEAT_VERSION_1 (1ULL << 32)

/* Device types. */
#define ID_NET 1
#define ID_BLOCK 2
#define ID_RNG 4

/* virtio-blk request types and status values. */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2

/* Every queue the guests use has this size (all bulkhead queues allow 256). */
#define QSIZE 16
/* wait_used's result when the device used nothing in time. */
#define NO_ANSWER 0xffffffffu

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
} __attribute__((packed));

struct avail {
    u16 flags;
    u16 idx;
    u16 ring[QSIZE];
    u16 used_event;
} __attribute__((packed));

struct used {
    u16 flags;
    u16 idx;
    struct {
        u32 id;
        u32 len;
    } __attribute__((packed)) ring[QSIZE];
    u16 avail_event;
} __attribute__((packed));

/* One split virtqueue: the three rings, aligned as virtio 1.2 section 2.7 asks. */
struct vq {
    struct desc desc[QSIZE] __attribute__((aligned(16)));
    struct avail avail __attribute__((aligned(16)));
    struct used used __attribute__((aligned(16)));
    u16 last_used;
};

struct vdev {
    u64 base; /* the register block */
    u32 id;   /* the device type */
};

#define barrier() __asm__ volatile("" ::: "memory")

static inline u32 vdev_read(const struct vdev *d, u32 reg) { return mmio_read32(d->base + reg); }
static inline void vdev_write(const struct vdev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }
static inline u32 vdev_status(const struct vdev *d) { return vdev_read(d, VIRTIO_MMIO_STATUS); }

/* The register block of the first device of type `id`, found as a kernel would: in the DSDT,
 * or without ACPI from the virtio_mmio.device= entries on the command line; 0 if none. Reads
 * only Magic and DeviceID of the blocks it considers. */
u64 virtio_find_device(u32 id);

/* Finds device `id`, resets it and negotiates: ACKNOWLEDGE, DRIVER, the offered features
 * ANDed with `features | VERSION_1`, FEATURES_OK. Queues are next. Returns 0 on failure
 * (no such device, or FEATURES_OK did not stick). */
int vdev_begin(struct vdev *d, u32 id, u64 features);

/* Configures queue `index` onto `q` (cleared first) and writes QueueReady=1. Returns the
 * QueueReady value read back. */
u32 vq_setup(struct vdev *d, u32 index, struct vq *q);

/* Sets DRIVER_OK; returns 1 when the status then reads exactly ACK|DRIVER|FEATURES_OK|DRIVER_OK. */
int vdev_driver_ok(struct vdev *d);

/* vdev_begin, vq_setup of queues 0..nq-1 onto qs[0..nq-1], vdev_driver_ok. Prints a line and
 * returns 0 on failure. */
int vdev_open(struct vdev *d, u32 id, u64 features, struct vq *qs, int nq);

void set_desc(struct desc *t, u16 i, u64 addr, u32 len, u16 flags, u16 next);

/* Puts chain `head` in the next avail slot, publishes it, and notifies queue `index`. */
void vq_post(struct vdev *d, u32 index, struct vq *q, u16 head);

/* Waits (bounded: a few seconds at most) for the device to use the next entry of `q`; acks
 * the interrupt. Returns the used length (and the chain head in *head if non-null), or
 * NO_ANSWER. */
u32 vq_wait_used(struct vdev *d, struct vq *q, u32 *head);

/* Prints `attack: used length N`, or `attack: no used entry` for NO_ANSWER. */
void vq_report_used(u32 len);

/* Polls Status (bounded) until any of `bits` shows; returns the last value read. */
u32 vdev_wait_status(struct vdev *d, u32 bits);

/* Prints `attack: device status 0x..` for `d` and ends the VM with status 0. */
__attribute__((noreturn)) void vdev_report_and_exit(struct vdev *d);

#endif
