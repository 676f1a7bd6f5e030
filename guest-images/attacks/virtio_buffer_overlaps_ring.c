/* virtio_buffer_overlaps_ring: a device-writable buffer over the queue's own used ring.
 *
 * Brings virtio-rng up correctly, then posts one chain whose single writable buffer (64
 * bytes) starts at the queue's used ring. A device that fills it overwrites the ring it
 * reports completions in, corrupting its own bookkeeping: the guest steers the device's
 * writes into structures the device trusts. Models the descriptor-validation bug class of
 * CVE-2019-18960 (guest-chosen buffers that the device must not write blindly).
 * Expected: virtio-rng0 counts chain.overlaps_rings=1 and hands the chain back unused.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

static struct vq q __attribute__((aligned(4096)));

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_buffer_overlaps_ring");
    if (!vdev_open(&d, ID_RNG, 0, &q, 1)) exit_guest(1);
    set_desc(q.desc, 0, (u64)&q.used, 64, F_WRITE, 0);
    vq_post(&d, 0, &q, 0);
    vq_report_used(vq_wait_used(&d, &q, 0));
    vdev_report_and_exit(&d);
}
