/* virtio-mmio (version 2) for the freestanding test guests: the register layout, status and
 * descriptor bits, the split-queue rings, finding a device as a kernel would, and feature
 * negotiation. Shared by the virtio guest and the attack corpus's driver. */
#ifndef BULKHEAD_GUEST_VIRTIO_H
#define BULKHEAD_GUEST_VIRTIO_H

#include "rt.h"

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
#define FEAT_INDIRECT (1ULL << 28)
#define FEAT_BLK_FLUSH (1ULL << 9)

/* Device types. */
#define ID_NET 1
#define ID_BLOCK 2
#define ID_RNG 4
#define ID_VSOCK 19

/* virtio-blk request types and status values. */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2

/* Every queue the guests use has this size (all bulkhead queues allow 256). */
#define QSIZE 16
/* What a wait for a used entry returns when the device used nothing in time. */
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

/* The register block of the first virtio-mmio device of type `id`: from the DSDT when the
 * machine has ACPI tables, else from the virtio_mmio.device= entries on the command line; 0 if
 * none. Reads only Magic and DeviceID of the blocks it considers. */
u64 virtio_mmio_find(u32 id);

/* Resets the device at `base` and negotiates: ACKNOWLEDGE, DRIVER, the offered features ANDed
 * with `features | VERSION_1`, FEATURES_OK. Returns 1 when FEATURES_OK stuck. */
int virtio_negotiate(u64 base, u64 features);

#endif
