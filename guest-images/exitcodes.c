/* exitcodes: ends the VM each way bulkhead knows, picked by `mode=` on the command line.
 *   mode=exit        (default) write `exit=N` to the guest-exit port
 *   mode=reset       ask the i8042 to reset the CPU
 *   mode=triple      fault with no usable IDT: a triple fault
 *   mode=halt        halt with interrupts disabled
 *   mode=unassigned  read and write a port and an MMIO address no device claims; exit 0 when
 *                    every read came back all-ones, 1 otherwise
 *   mode=echo        read a line from the serial console, echo it, exit with the number it holds
 *   mode=poweroff    enter S5 through the sleep control register the FADT names, with the
 *                    SLP_TYP that \_S5 declares
 *   mode=acpi-reset  write the FADT's reset value to its reset register
 *   mode=panic       report a kernel panic to the pvpanic device the DSDT names (QEMU0001)
 *   mode=crash-loaded  report a panic with a crash kernel loaded, then exit 0
 *   mode=blind-power   without reading any table, write S5 to port 0x600, the reset value to
 *                    0x602 and PANICKED to 0x505; exit 0x7d if the VM is still running
 *   mode=storm       write the serial scratch register `storm=N` times (one port-I/O exit each,
 *                    to a register every VMM's 16550 has), then reset through the i8042
 *   mode=idle        say "exitcodes: idle", then halt with interrupts on for good (an IDT of
 *                    bare iretq stubs takes any stray interrupt); with `chatter=N`, print
 *                    mode=chatter's N bytes first
 *   mode=chatter     print `chatter=N` (default 2000) bytes of a known pattern, lines of 64,
 *                    polling the line status before each as a console does; then set DLAB,
 *                    write the divisor latch through the data register's port and read it
 *                    back: exit 0 when it reads what was written, 1 otherwise; with
 *                    `thri=M quiet=K`, M more bytes with the transmit interrupt enabled and
 *                    K with it off again before the divisor
 *   mode=spin        print `chatter=N` pattern bytes and "exitcodes: spinning", then spin
 *                    with no exit for good
 * reset, storm and idle end (or never end) in ways Firecracker and the bare-KVM floor
 * understand too, for scripts/bench.
 * The ACPI modes exit 0x7e when the tables lack what they need.
 */
#include "lib/rt.h"
#include "lib/acpi.h"

#define UNASSIGNED_PORT 0x3000
/* The start of the 32-bit MMIO gap: the virtio devices begin at 0xd0000000. */
#define UNASSIGNED_MMIO 0xc0000000ULL

/* A gate that returns at once, for the idle mode's IDT. */
void idle_isr(void);
__asm__(".text\n.global idle_isr\nidle_isr:\n iretq\n");

struct idt_gate {
    u16 offset_low, selector;
    u8 ist, type;
    u16 offset_mid;
    u32 offset_high, zero;
} __attribute__((packed));

static struct idt_gate idle_idt[256];

__attribute__((noreturn)) static void idle(void) {
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    u64 isr = (u64)idle_isr;
    for (int i = 0; i < 256; i++) {
        idle_idt[i] = (struct idt_gate){(u16)isr, cs, 0, 0x8e, (u16)(isr >> 16), (u32)(isr >> 32), 0};
    }
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof idle_idt - 1, (u64)idle_idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
    puts("exitcodes: idle\n");
    for (;;) __asm__ volatile("sti; hlt");
}

static void triple_fault(void) {
    /* An IDT with limit 0: the #UD from ud2 can not be delivered, nor the #DF that follows. */
    struct { u16 limit; u64 base; } __attribute__((packed)) idt = {0, 0};
    __asm__ volatile("lidt %0; ud2" : : "m"(idt));
}

static int unassigned(void) {
    int ok = 1;
    ok &= inb(UNASSIGNED_PORT) == 0xff;
    ok &= inw(UNASSIGNED_PORT) == 0xffff;
    ok &= inl(UNASSIGNED_PORT) == 0xffffffffu;
    outb(UNASSIGNED_PORT, 0x12);
    ok &= mmio_read32(UNASSIGNED_MMIO) == 0xffffffffu;
    mmio_write32(UNASSIGNED_MMIO, 0x12345678);
    puts(ok ? "unassigned: all reads were all-ones\n" : "unassigned: a read was not all-ones\n");
    return ok ? 0 : 1;
}

/* Reads console input until a newline; returns the decimal number typed (at most 255). */
static u8 echo_line(void) {
    u64 n = 0;
    puts("echo: ready\n");
    for (;;) {
        char c = (char)serial_getc();
        if (c == '\r' || c == '\n') break;
        putc(c);
        if (c >= '0' && c <= '9' && n < 1000) n = n * 10 + (u64)(c - '0');
    }
    puts("\n");
    return n > 255 ? 255 : (u8)n;
}

#define SLP_EN 0x20
#define PVPANIC_PANICKED 1
#define PVPANIC_CRASH_LOADED 2

__attribute__((noreturn)) static void missing(const char *what) {
    puts("exitcodes: the ACPI tables lack ");
    puts(what);
    puts("\n");
    exit_guest(0x7e);
}

static void acpi_power(int reset) {
    const u8 *fadt = acpi_table("FACP");
    if (!fadt) missing("a FADT");
    if (reset) {
        if (!(*(const u32 *)(fadt + FADT_FLAGS) & (1u << 10))) missing("RESET_REG_SUP");
        u16 port = (u16)*(const u64 *)(fadt + FADT_RESET_REG + GAS_ADDRESS);
        puts("exitcodes: resetting through the ACPI reset register\n");
        outb(port, fadt[FADT_RESET_VALUE]);
        return;
    }
    int slp_typ = acpi_s5_sleep_type();
    if (slp_typ < 0) missing("\\_S5");
    u16 control = (u16)*(const u64 *)(fadt + FADT_SLEEP_CONTROL_REG + GAS_ADDRESS);
    u16 status = (u16)*(const u64 *)(fadt + FADT_SLEEP_STATUS_REG + GAS_ADDRESS);
    if (!control || !status) missing("sleep registers");
    puts("exitcodes: powering off (S5)\n");
    outb(status, 0x80);
    outb(control, (u8)(((slp_typ & 7) << 2) | SLP_EN));
}

static void pvpanic(u8 event) {
    const u8 *at = 0;
    u16 port = (u16)acpi_device_resource("QEMU0001", 0, &at);
    if (!port) missing("a pvpanic device");
    if (!(inb(port) & event)) missing("the pvpanic event");
    puts(event == PVPANIC_PANICKED ? "exitcodes: panicking\n" : "exitcodes: panicking into a crash kernel\n");
    outb(port, event);
}

/* The pattern mode=chatter prints: byte i of a line is '0' + (line + i) % 64, lines of 63
 * such bytes and a newline. */
static void pattern(u64 n) {
    for (u64 i = 0; i < n; i++) putc(i % 64 == 63 ? '\n' : (char)('0' + (i / 64 + i % 64) % 64));
}

static u8 chatter(void) {
    pattern(cmdline_u64("chatter", 2000));
    /* With `thri=M`: M more bytes with the transmit interrupt enabled (IF stays clear, so
     * the interrupt is never taken), then `quiet=K` bytes with it off again. */
    u64 thri = cmdline_u64("thri", 0);
    if (thri) {
        outb(SERIAL_PORT + 1, 0x02);
        pattern(thri);
        outb(SERIAL_PORT + 1, 0x00);
        pattern(cmdline_u64("quiet", 0));
    }
    /* The divisor latch: written through the same port as console bytes, then read back. */
    outb(SERIAL_PORT + 3, 0x83);
    outb(SERIAL_PORT, 0x5a);
    u8 back = inb(SERIAL_PORT);
    outb(SERIAL_PORT + 3, 0x03);
    puts(back == 0x5a ? "\nexitcodes: divisor read back\n" : "\nexitcodes: divisor lost\n");
    return back == 0x5a ? 0 : 1;
}

void guest_main(void) {
    int len;
    const char *mode = cmdline_value("mode", &len);
    if (!mode || str_eq(mode, len, "exit")) {
        exit_guest((u8)cmdline_u64("exit", 0));
    } else if (str_eq(mode, len, "reset")) {
        puts("exitcodes: resetting through the i8042\n");
        outb(I8042_COMMAND_PORT, 0xfe);
    } else if (str_eq(mode, len, "storm")) {
        u64 n = cmdline_u64("storm", 100000);
        for (u64 i = 0; i < n; i++) outb(SERIAL_PORT + 7, (u8)i);
        puts("exitcodes: storm done, resetting\n");
        outb(I8042_COMMAND_PORT, 0xfe);
    } else if (str_eq(mode, len, "idle")) {
        pattern(cmdline_u64("chatter", 0));
        idle();
    } else if (str_eq(mode, len, "chatter")) {
        exit_guest(chatter());
    } else if (str_eq(mode, len, "spin")) {
        pattern(cmdline_u64("chatter", 0));
        puts("exitcodes: spinning\n");
        for (;;) __asm__ volatile("pause");
    } else if (str_eq(mode, len, "triple")) {
        puts("exitcodes: triple fault\n");
        triple_fault();
    } else if (str_eq(mode, len, "halt")) {
        puts("exitcodes: halting with interrupts off\n");
        halt_forever();
    } else if (str_eq(mode, len, "unassigned")) {
        exit_guest((u8)unassigned());
    } else if (str_eq(mode, len, "echo")) {
        exit_guest(echo_line());
    } else if (str_eq(mode, len, "poweroff")) {
        acpi_power(0);
    } else if (str_eq(mode, len, "acpi-reset")) {
        acpi_power(1);
    } else if (str_eq(mode, len, "panic")) {
        pvpanic(PVPANIC_PANICKED);
    } else if (str_eq(mode, len, "blind-power")) {
        outb(0x600, (5 << 2) | SLP_EN);
        outb(0x602, 1);
        outb(0x505, PVPANIC_PANICKED);
        puts("exitcodes: still running\n");
        exit_guest(0x7d);
    } else if (str_eq(mode, len, "crash-loaded")) {
        pvpanic(PVPANIC_CRASH_LOADED);
        exit_guest(0);
    }
    puts("exitcodes: unknown mode\n");
    exit_guest(0x7f);
}
