/* Reading the ACPI tables bulkhead writes, the way a kernel finds them: the RSDP from the boot
 * protocol (or a scan of 0xE0000-0xFFFFF), then the XSDT, FADT, MADT and DSDT, every checksum
 * checked. Enough AML reading to find devices by _HID in the DSDT. */
#ifndef BULKHEAD_GUEST_ACPI_H
#define BULKHEAD_GUEST_ACPI_H

#include "rt.h"

/* The table with this signature ("FACP", "APIC", "DSDT"), checksum checked, or 0. */
const u8 *acpi_table(const char *sig);
/* The enabled processors' APIC ids in the MADT (at most `max`); returns the count, or -1
 * without a MADT. */
int acpi_madt_cpus(u8 *ids, int max);
/* The first resource of the device with _HID `hid` (a string _HID like "LNRO0005" or
 * "QEMU0001") after `after` (0 to start): the base of its Memory32Fixed or IO descriptor.
 * Returns 0 when there is none; `*next` gets where to continue. */
u64 acpi_device_resource(const char *hid, const u8 *after, const u8 **next);
/* The SLP_TYP `\_S5` declares, or -1. */
int acpi_s5_sleep_type(void);

/* FADT fields (the FADT must exist). */
#define FADT_FLAGS 112
#define FADT_RESET_REG 116
#define FADT_RESET_VALUE 128
#define FADT_X_DSDT 140
#define FADT_SLEEP_CONTROL_REG 244
#define FADT_SLEEP_STATUS_REG 256
/* In a generic address structure: the address. */
#define GAS_ADDRESS 4

#endif
