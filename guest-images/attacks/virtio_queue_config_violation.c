/* virtio_queue_config_violation: a queue size that is not a power of two.
 *
 * Negotiates virtio-rng correctly, selects queue 0 and writes QueueNum=3, then finishes a
 * correct setup (size 16, rings in RAM, QueueReady, DRIVER_OK). Split-ring index arithmetic
 * assumes a power-of-two size; a device that accepts 3 computes ring slots wrongly and reads
 * or writes past the rings. The bug class is the device trusting driver-chosen queue
 * geometry, the same transport-validation class as CVE-2026-5747.
 * Expected: virtio-rng0 counts transport.bad_queue_size=1 and nothing else; the device runs.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

static struct vq q __attribute__((aligned(4096)));

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_queue_config_violation");
    if (!vdev_begin(&d, ID_RNG, 0)) exit_guest(1);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_SEL, 0);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_NUM, 3);
    if (vq_setup(&d, 0, &q) != 1 || !vdev_driver_ok(&d)) puts("attack: the correct setup afterwards failed\n");
    vdev_report_and_exit(&d);
}
