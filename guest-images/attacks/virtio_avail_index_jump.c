/* virtio_avail_index_jump: the available index jumps by more than the queue size.
 *
 * Brings virtio-rng up correctly, then sets avail.idx to last_avail + QSIZE + 5 (21 new
 * "chains" in a 16-entry ring) and notifies. A device that believes the index processes
 * stale or duplicated ring entries, or loops for a very long time. Models CVE-2016-5403
 * (QEMU virtqueue_pop: a guest submitting more requests than the ring holds exhausts host
 * memory).
 * Expected: virtio-rng0 counts chain.avail_index_jump=1 and sets NEEDS_RESET (0x40) in Status.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

static struct vq q __attribute__((aligned(4096)));

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_avail_index_jump");
    if (!vdev_open(&d, ID_RNG, 0, &q, 1)) exit_guest(1);
    /* Nothing was made available yet: the device's last seen index is 0. */
    q.avail.idx = (u16)(0 + QSIZE + 5);
    barrier();
    vdev_write(&d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    vdev_wait_status(&d, S_NEEDS_RESET);
    vdev_report_and_exit(&d);
}
