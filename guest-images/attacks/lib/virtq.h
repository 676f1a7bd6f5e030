/* A minimal virtio-mmio (version 2) split-queue driver for the attack guests.
 *
 * Every helper here does exactly what a correct driver does, so that a guest built on it
 * trips only the one refusal its attack is about. Everything is polled (interrupts stay off)
 * and every wait is bounded: a guest never hangs, whatever the device does.
 */
#ifndef BULKHEAD_ATTACKS_VIRTQ_H
#define BULKHEAD_ATTACKS_VIRTQ_H

#include "../../lib/virtio.h"

struct vdev {
    u64 base; /* the register block */
    u32 id;   /* the device type */
};

#define barrier() __asm__ volatile("" ::: "memory")

static inline u32 vdev_read(const struct vdev *d, u32 reg) { return mmio_read32(d->base + reg); }
static inline void vdev_write(const struct vdev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }
static inline u32 vdev_status(const struct vdev *d) { return vdev_read(d, VIRTIO_MMIO_STATUS); }

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

/* Posts the block request chained from descriptor 0 of queue 0, waits for it, prints the used
 * length and the request's `status` byte, then vdev_report_and_exit. */
__attribute__((noreturn)) void vq_finish_block_request(struct vdev *d, struct vq *q, const u8 *status);

#endif
