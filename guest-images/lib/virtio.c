/* See virtio.h. */
#include "virtio.h"
#include "acpi.h"

static int is_virtio(u64 base, u32 id) {
    return mmio_read32(base + VIRTIO_MMIO_MAGIC) == VIRTIO_MAGIC_VALUE &&
           mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) == id;
}

static u64 parse_hex(const char **p) {
    u64 v = 0;
    for (;;) {
        char c = **p;
        int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (digit < 0) return v;
        v = v * 16 + (u64)digit;
        (*p)++;
    }
}

u64 virtio_mmio_find(u32 id) {
    if (acpi_table("DSDT")) {
        const u8 *at = 0;
        u64 base;
        while ((base = acpi_device_resource("LNRO0005", at, &at)) != 0) {
            if (is_virtio(base, id)) return base;
        }
        return 0;
    }
    static const char key[] = "virtio_mmio.device=4K@0x";
    const char *p = cmdline();
    while (*p) {
        const char *k = key, *t = p;
        while (*k && *t == *k) { t++; k++; }
        if (!*k) {
            u64 base = parse_hex(&t);
            if (is_virtio(base, id)) return base;
        }
        while (*p && *p != ' ') p++;
        while (*p == ' ') p++;
    }
    return 0;
}

int virtio_negotiate(u64 base, u64 features) {
    features |= FEAT_VERSION_1;
    mmio_write32(base + VIRTIO_MMIO_STATUS, 0);
    mmio_write32(base + VIRTIO_MMIO_STATUS, S_ACK);
    mmio_write32(base + VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    features &= offered;
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, (u32)features);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, (u32)(features >> 32));
    mmio_write32(base + VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    return (mmio_read32(base + VIRTIO_MMIO_STATUS) & S_FEATURES_OK) != 0;
}
