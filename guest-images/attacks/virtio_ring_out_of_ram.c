/* virtio_ring_out_of_ram: a queue whose descriptor table lies outside guest RAM.
 *
 * Negotiates virtio-rng correctly, then configures queue 0 with a valid size and avail/used
 * rings in RAM but QueueDesc = 0xc0000000 (16-aligned, in the MMIO gap), and writes
 * QueueReady=1. A device that accepts it reads descriptors from (or, with a used ring there,
 * writes into) memory that is not the guest's. Models CVE-2019-18960 (guest-controlled
 * addresses outside guest memory) at the ring level.
 * Expected: the QueueReady write is refused and virtio-rng0 counts chain.ring_outside_ram=1.
 * The guest then stops: it does not set DRIVER_OK, so nothing else is counted.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

#define OUTSIDE_RAM 0xc0000000u

static struct vq q __attribute__((aligned(4096)));

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_ring_out_of_ram");
    if (!vdev_begin(&d, ID_RNG, 0)) exit_guest(1);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_SEL, 0);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_NUM, QSIZE);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_DESC_LOW, OUTSIDE_RAM);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(u64)&q.avail);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(u64)&q.used);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_READY, 1);
    puts("attack: queue ready ");
    put_dec(vdev_read(&d, VIRTIO_MMIO_QUEUE_READY));
    putc('\n');
    vdev_report_and_exit(&d);
}
