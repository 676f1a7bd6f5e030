/* virtio_bad_chain: a descriptor chain that loops.
 *
 * Brings virtio-rng up correctly, then posts a chain of two writable descriptors with valid
 * 64-byte buffers in RAM where 0 says NEXT=1 and 1 says NEXT=0. A device that follows `next`
 * without a bound spins forever (or until it overflows something). Models CVE-2016-6490
 * (QEMU virtqueue_map_desc: zero-length descriptors / descriptor loops, an infinite loop in
 * the host).
 * Expected: virtio-rng0 counts chain.loop=1 and hands the chain back unused.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

static struct vq q __attribute__((aligned(4096)));
static u8 buf[2][64];

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_bad_chain");
    if (!vdev_open(&d, ID_RNG, 0, &q, 1)) exit_guest(1);
    set_desc(q.desc, 0, (u64)buf[0], 64, F_WRITE | F_NEXT, 1);
    set_desc(q.desc, 1, (u64)buf[1], 64, F_WRITE | F_NEXT, 0);
    vq_post(&d, 0, &q, 0);
    vq_report_used(vq_wait_used(&d, &q, 0));
    vdev_report_and_exit(&d);
}
