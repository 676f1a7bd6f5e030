/* virtio_malformed_payload: a block request with a short (8-byte) header.
 *
 * Needs `--disk FILE`. Brings virtio-blk0 up correctly, then submits a chain of one readable
 * 8-byte descriptor (type IN, but no sector field) and one writable status byte. A device
 * that reads the 16-byte struct virtio_blk_outhdr regardless reads past the buffer the guest
 * gave it (here into the status byte's memory, in general into whatever follows), and acts
 * on a sector number the guest never sent. Models malformed request payloads parsed without
 * length checks (the request-level counterpart of CVE-2016-6490's unchecked lengths).
 * Expected: status IOERR (1); virtio-blk0 counts request.bad_header=1.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

static struct vq q __attribute__((aligned(4096)));
static u8 header[8] __attribute__((aligned(16)));
static u8 status[1];

void guest_main(void) {
    struct vdev d;
    attack_begin("virtio_malformed_payload");
    if (!vdev_open(&d, ID_BLOCK, 0, &q, 1)) exit_guest(1);
    *(u32 *)header = BLK_T_IN;
    *(u32 *)(header + 4) = 0; /* reserved; the sector field is missing */
    status[0] = 0xee;
    set_desc(q.desc, 0, (u64)header, sizeof(header), F_NEXT, 1);
    set_desc(q.desc, 1, (u64)status, 1, F_WRITE, 0);
    vq_finish_block_request(&d, &q, status);
}
