/* virtio_reconfig_after_activation: changing a live queue's layout after DRIVER_OK.
 *
 * Brings virtio-rng up correctly, then writes QueueNum (8) and QueueDescLow (a second table
 * in RAM) while the device is running. A device that takes the new values mid-flight walks
 * a table of the wrong size or at an address it never validated. Models CVE-2026-5747
 * (queue reconfiguration after activation).
 * Expected: both writes are refused (transport.queue_locked=2). With --on-violation log, a valid
 * request posted afterwards in the ORIGINAL table is still served (the layout did not move);
 * by default the device is in NEEDS_RESET and serves nothing until it is reset.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

static struct vq q __attribute__((aligned(4096)));
static struct desc other_table[QSIZE] __attribute__((aligned(16)));
static u8 buf[64];

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_reconfig_after_activation");
    if (!vdev_open(&d, ID_RNG, 0, &q, 1)) exit_guest(1);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_NUM, 8);
    vdev_write(&d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)other_table);
    /* The payoff an attacker wants: the next chain read from the new table. Here the
     * original table holds a valid 64-byte request; the new one holds nothing. */
    set_desc(q.desc, 0, (u64)buf, sizeof(buf), F_WRITE, 0);
    vq_post(&d, 0, &q, 0);
    vq_report_used(vq_wait_used(&d, &q, 0));
    vdev_report_and_exit(&d);
}
