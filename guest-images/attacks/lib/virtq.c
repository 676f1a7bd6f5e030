/* A minimal virtio-mmio split-queue driver for the attack guests; see virtq.h. The registers,
 * rings, device discovery and feature negotiation are ../../lib/virtio.h's. */
#include "virtq.h"
#include "attack.h"

/* How long a wait may take, by the clock. Each poll is a VM exit and lets the VMM's device
 * thread run; a device answers in well under a millisecond, and a wait that runs out means it
 * will not answer (an attack left it stopped). */
#define POLL_LIMIT_MS 2000ULL

int vdev_begin(struct vdev *d, u32 id, u64 features) {
    d->id = id;
    d->base = virtio_mmio_find(id);
    return d->base && virtio_negotiate(d->base, features);
}

u32 vq_setup(struct vdev *d, u32 index, struct vq *q) {
    memset(q, 0, sizeof(*q));
    vdev_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
    vdev_write(d, VIRTIO_MMIO_QUEUE_NUM, QSIZE);
    vdev_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
    vdev_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
    vdev_write(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(u64)&q->avail);
    vdev_write(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)((u64)&q->avail >> 32));
    vdev_write(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(u64)&q->used);
    vdev_write(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)((u64)&q->used >> 32));
    vdev_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    return vdev_read(d, VIRTIO_MMIO_QUEUE_READY);
}

int vdev_driver_ok(struct vdev *d) {
    const u32 all = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    vdev_write(d, VIRTIO_MMIO_STATUS, all);
    return vdev_status(d) == all;
}

int vdev_open(struct vdev *d, u32 id, u64 features, struct vq *qs, int nq) {
    if (!vdev_begin(d, id, features)) {
        puts("attack: device not found or feature negotiation failed\n");
        return 0;
    }
    for (int i = 0; i < nq; i++) {
        if (vq_setup(d, (u32)i, &qs[i]) != 1) {
            puts("attack: queue setup failed\n");
            return 0;
        }
    }
    if (!vdev_driver_ok(d)) {
        puts("attack: DRIVER_OK did not stick\n");
        return 0;
    }
    return 1;
}

void set_desc(struct desc *t, u16 i, u64 addr, u32 len, u16 flags, u16 next) {
    t[i].addr = addr;
    t[i].len = len;
    t[i].flags = flags;
    t[i].next = next;
}

void vq_post(struct vdev *d, u32 index, struct vq *q, u16 head) {
    q->avail.ring[q->avail.idx % QSIZE] = head;
    barrier();
    q->avail.idx++;
    barrier();
    vdev_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, index);
}

u32 vq_wait_used(struct vdev *d, struct vq *q, u32 *head) {
    for (u64 until = deadline_after_ms(POLL_LIMIT_MS); !past(until);) {
        u32 isr = vdev_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);
        barrier();
        if (*(volatile u16 *)&q->used.idx == q->last_used) {
            /* A configuration interrupt with nothing used: the device stopped (NEEDS_RESET)
             * and will serve nothing more until it is reset. */
            if (isr & 2) return NO_ANSWER;
            continue;
        }
        u32 len = q->used.ring[q->last_used % QSIZE].len;
        if (head) *head = q->used.ring[q->last_used % QSIZE].id;
        q->last_used++;
        /* The device raises the interrupt once it has finished the batch: wait for it, so
         * no interrupt is left pending, then acknowledge it. */
        for (u64 w = deadline_after_ms(POLL_LIMIT_MS); !(isr & 1) && !past(w);)
            isr = vdev_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);
        if (isr) vdev_write(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
        return len;
    }
    return NO_ANSWER;
}

void vq_report_used(u32 len) {
    if (len == NO_ANSWER) {
        puts("attack: no used entry\n");
        return;
    }
    puts("attack: used length ");
    put_dec(len);
    putc('\n');
}

u32 vdev_wait_status(struct vdev *d, u32 bits) {
    u32 s = 0;
    for (u64 until = deadline_after_ms(POLL_LIMIT_MS); !(s & bits) && !past(until);) s = vdev_status(d);
    return s;
}

void vdev_report_and_exit(struct vdev *d) {
    puts("attack: device status ");
    put_hex(vdev_status(d));
    putc('\n');
    attack_end(0);
}

void vq_finish_block_request(struct vdev *d, struct vq *q, const u8 *status) {
    vq_post(d, 0, q, 0);
    vq_report_used(vq_wait_used(d, q, 0));
    puts("attack: request status ");
    put_dec(*status);
    putc('\n');
    vdev_report_and_exit(d);
}
