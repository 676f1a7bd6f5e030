/* net_mac_spoof: sending a frame with another machine's source MAC.
 *
 * Needs `--net tap=NAME`. Brings virtio-net up correctly (queue 0 receive, queue 1 transmit,
 * no features but VERSION_1), reads the VM's MAC from config space, and sends one broadcast
 * frame (ethertype 0x88b5, IEEE local experimental) whose source MAC is 02:66:66:66:66:66,
 * not the VM's. A VMM that forwards it lets a tenant impersonate another host on the
 * network (ARP/ND spoofing, poisoning a neighbour's forwarding table).
 * Expected: virtio-net0 takes the chain (used length 0), drops the frame and counts
 * request.foreign_source_mac=1.
 */
#include "lib/attack.h"
#include "lib/virtq.h"

#define NET_HDR_LEN 12 /* struct virtio_net_hdr_v1, num_buffers included */
#define FRAME_LEN 60   /* minimum Ethernet frame without FCS */
#define ETHERTYPE_TEST 0x88b5

static struct vq qs[2] __attribute__((aligned(4096)));
static u8 frame[NET_HDR_LEN + FRAME_LEN] __attribute__((aligned(16)));

static void put_mac(const u8 *mac) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 6; i++) {
        if (i) putc(':');
        putc(digits[mac[i] >> 4]);
        putc(digits[mac[i] & 0xf]);
    }
}

void guest_main(void) {
    struct vdev d;
    attack_begin("net_mac_spoof");
    if (!vdev_open(&d, ID_NET, 0, qs, 2)) exit_guest(1);
    u8 mac[6];
    for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(d.base + VIRTIO_MMIO_CONFIG + i);
    puts("attack: device MAC ");
    put_mac(mac);
    putc('\n');

    static const u8 spoofed[6] = {0x02, 0x66, 0x66, 0x66, 0x66, 0x66};
    memset(frame, 0, sizeof(frame)); /* the virtio-net header: all zero */
    u8 *eth = frame + NET_HDR_LEN;
    memset(eth, 0xff, 6);           /* destination: broadcast */
    memcpy(eth + 6, spoofed, 6);    /* source: not ours */
    int same = 1;
    for (int i = 0; i < 6; i++) same &= mac[i] == spoofed[i];
    if (same) eth[11] ^= 1; /* the VMM happened to pick that MAC: spoof a neighbour of it */
    eth[12] = ETHERTYPE_TEST >> 8;
    eth[13] = ETHERTYPE_TEST & 0xff;
    memcpy(eth + 14, "bulkhead-mac-spoof", 18);
    puts("attack: sending from ");
    put_mac(eth + 6);
    putc('\n');

    set_desc(qs[1].desc, 0, (u64)frame, sizeof(frame), 0, 0);
    vq_post(&d, 1, &qs[1], 0);
    vq_report_used(vq_wait_used(&d, &qs[1], 0));
    vdev_report_and_exit(&d);
}
