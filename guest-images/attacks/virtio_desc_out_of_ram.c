/* virtio_desc_out_of_ram: a descriptor whose buffer lies outside guest RAM.
 *
 * Brings virtio-rng up correctly, then posts one chain whose single device-writable buffer
 * is at 0xc0000000 (the MMIO gap: no RAM behind it), 64 bytes. A device that trusts the
 * address writes host memory that is not the guest's. Models CVE-2019-18960 (Firecracker's
 * vsock device could be made to access memory outside the guest's through guest-supplied
 * descriptors).
 * Expected: virtio-rng0 counts chain.outside_ram=1 and hands the chain back unused.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

#define OUTSIDE_RAM 0xc0000000ULL

static struct vq q __attribute__((aligned(4096)));

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_desc_out_of_ram");
    if (!vdev_open(&d, ID_RNG, 0, &q, 1)) exit_guest(1);
    set_desc(q.desc, 0, OUTSIDE_RAM, 64, F_WRITE, 0);
    vq_post(&d, 0, &q, 0);
    vq_report_used(vq_wait_used(&d, &q, 0));
    vdev_report_and_exit(&d);
}
