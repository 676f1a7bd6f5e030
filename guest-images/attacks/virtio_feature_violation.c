/* virtio_feature_violation: writing to a disk the device declared read-only.
 *
 * Needs `--disk FILE,ro`. Brings virtio-blk0 up correctly (accepting VIRTIO_BLK_F_RO, so the
 * driver knows the disk is read-only), then submits a well-formed VIRTIO_BLK_T_OUT of one
 * sector to sector 1. A device that honours only the driver's good manners writes the
 * tenant's "read-only" image (a shared base image, say). Sector 1, not 0, so the write is not
 * also an image-magic write.
 * Expected: status IOERR (1); virtio-blk0 counts request.read_only=1.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

#define FEAT_BLK_RO (1ULL << 5)

static struct vq q __attribute__((aligned(4096)));
static u8 header[16] __attribute__((aligned(16)));
static u8 sector[512] __attribute__((aligned(512)));
static u8 status[1];

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_feature_violation");
    if (!vdev_open(&d, ID_BLOCK, FEAT_BLK_RO, &q, 1)) exit_guest(1);
    *(u32 *)header = BLK_T_OUT;
    *(u64 *)(header + 8) = 1;
    memset(sector, 0x5a, sizeof(sector));
    status[0] = 0xee;
    set_desc(q.desc, 0, (u64)header, 16, F_NEXT, 1);
    set_desc(q.desc, 1, (u64)sector, 512, F_NEXT, 2);
    set_desc(q.desc, 2, (u64)status, 1, F_WRITE, 0);
    vq_finish_block_request(&d, &q, status);
}
