/* kvm-floor: the least a program must do to run one of bulkhead's freestanding test guests on
 * KVM, as the floor the benchmarks divide bulkhead's figures by. It loads the guest ELF at its
 * physical addresses, enters it in long mode with the Linux zero page in RSI (for its command
 * line), and runs KVM_RUN in a loop, handling only the ports the test guests use: the serial
 * port (output to stdout, the line status always ready), the guest-exit port 0xf4, the
 * boot-complete port 0xf5, port 0x80, and the i8042 reset (0xfe to 0x64, status 0). Every other
 * port reads all-ones.
 *
 *   cc -O2 -o target/kvm-floor benches/floor/kvm-floor.c
 *   target/kvm-floor [--mem MIB] [--cmdline STR] [--irqchip | --split-irqchip [--irqfds N]] [--pit]
 *                    [--coalesce-serial] [--times] [--idle] GUEST.elf
 *
 * --irqchip and --pit add the in-kernel interrupt controllers and PIT that bulkhead creates;
 * --split-irqchip keeps only the local APICs in the kernel; --irqfds N (with either) adds N irqfds and N
 * ioeventfds, as N devices would. They show what each costs: --times
 * prints each phase's duration to stderr (setup, run, and the teardown that closing the VM
 * starts in the kernel).
 * --coalesce-serial: KVM holds the serial data register's writes in its coalesced ring (drained
 * before each exit is handled), as bulkhead does while the UART's transmit interrupt is off;
 * the plain floor exits for every byte.
 * --idle: a halt (which exits here, with no in-kernel local APIC) flushes the output and
 * sleeps until a signal, as an idle guest would sit in the kernel; for memory figures.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#ifndef PAGE_SIZE
#define PAGE_SIZE 4096
#endif
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define GDT_ADDR 0x500
#define ZERO_PAGE 0x7000
#define STACK_TOP 0x8ff0
#define PML4 0x9000
#define PDPT 0xa000
#define PD 0xb000
#define CMDLINE 0x20000
#define BP_CMD_LINE_PTR 0x228
#define BP_CMDLINE_SIZE 0x238
#define TSS_ADDR 0xfffbd000

static void die(const char *what) {
    fprintf(stderr, "kvm-floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Copies the ELF's loadable segments to their physical addresses; returns the entry. */
static uint64_t load_elf(const char *path, uint8_t *mem, uint64_t mem_size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die(path);
    struct stat st;
    if (fstat(fd, &st) < 0) die(path);
    uint8_t *file = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (file == MAP_FAILED) die(path);
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)file;
    if ((size_t)st.st_size < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 ||
        eh->e_ident[EI_CLASS] != ELFCLASS64) {
        fprintf(stderr, "kvm-floor: %s is not an ELF64 file\n", path);
        exit(2);
    }
    for (int i = 0; i < eh->e_phnum; i++) {
        const Elf64_Phdr *ph = (const Elf64_Phdr *)(file + eh->e_phoff + (uint64_t)i * eh->e_phentsize);
        if (ph->p_type != PT_LOAD) continue;
        if (ph->p_paddr + ph->p_memsz > mem_size || ph->p_offset + ph->p_filesz > (uint64_t)st.st_size) {
            fprintf(stderr, "kvm-floor: a segment of %s does not fit\n", path);
            exit(2);
        }
        memcpy(mem + ph->p_paddr, file + ph->p_offset, ph->p_filesz);
        memset(mem + ph->p_paddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
    }
    uint64_t entry = eh->e_entry;
    munmap(file, st.st_size);
    close(fd);
    return entry;
}

/* GDT (null, 64-bit code, data), identity page tables for the first GiB, zero page, cmdline. */
static void write_boot_tables(uint8_t *mem, const char *cmdline) {
    uint64_t gdt[3] = {0, 0x00af9b000000ffffULL, 0x00cf93000000ffffULL};
    memcpy(mem + GDT_ADDR, gdt, sizeof(gdt));
    uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PDPT), *pd = (uint64_t *)(mem + PD);
    pml4[0] = PDPT | 3;
    pdpt[0] = PD | 3;
    for (uint64_t i = 0; i < 512; i++) pd[i] = (i << 21) | 0x83;
    size_t len = strlen(cmdline);
    memcpy(mem + CMDLINE, cmdline, len + 1);
    *(uint32_t *)(mem + ZERO_PAGE + BP_CMD_LINE_PTR) = CMDLINE;
    *(uint32_t *)(mem + ZERO_PAGE + BP_CMDLINE_SIZE) = (uint32_t)len;
}

static void set_registers(int vcpu, uint64_t entry) {
    struct kvm_sregs s;
    if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
    struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
                               .present = 1, .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1};
    struct kvm_segment data = code;
    data.selector = 16;
    data.type = 3;
    data.l = 0;
    data.db = 1;
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = 3 * 8 - 1;
    s.cr3 = PML4;
    s.cr4 = 1 << 5;                              /* PAE */
    s.cr0 = (1u << 0) | (1u << 4) | (1u << 31);  /* PE, ET, PG */
    s.efer = (1 << 8) | (1 << 10);               /* LME, LMA */
    if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
    struct kvm_regs r = {.rip = entry, .rsi = ZERO_PAGE, .rsp = STACK_TOP, .rflags = 2};
    if (ioctl(vcpu, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");
}

/* Handles one port access; returns -1 to go on, else the exit status. */
static int port_io(struct kvm_run *run) {
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint16_t port = run->io.port;
    if (run->io.direction == KVM_EXIT_IO_OUT) {
        if (port == 0x3f8 && run->io.size == 1) {
            for (uint32_t i = 0; i < run->io.count; i++) putchar(data[i]);
        } else if (port == 0xf4 && run->io.size == 1) {
            return data[0];
        } else if (port == 0x64 && run->io.size == 1 && data[0] == 0xfe) {
            return 0;
        }
        return -1;
    }
    memset(data, 0xff, (size_t)run->io.size * run->io.count);
    if (port == 0x3fd) data[0] = 0x60; /* transmitter empty */
    return -1;
}

/* Drains the coalesced ring (serial data-register writes KVM kept) before an exit is handled. */
static void drain_coalesced(struct kvm_coalesced_mmio_ring *ring) {
    if (!ring) return;
    while (ring->first != __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE)) {
        struct kvm_coalesced_mmio *e = &ring->coalesced_mmio[ring->first];
        if (e->pio && e->phys_addr == 0x3f8 && e->len == 1) putchar(e->data[0]);
        __atomic_store_n(&ring->first, (ring->first + 1) % KVM_COALESCED_MMIO_MAX, __ATOMIC_RELEASE);
    }
}

int main(int argc, char **argv) {
    uint64_t mem_mib = 128;
    const char *cmdline = "", *guest = NULL;
    int irqchip = 0, split = 0, pit = 0, times = 0, irqfds = 0, idle = 0, coalesce = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mem") && i + 1 < argc) mem_mib = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--cmdline") && i + 1 < argc) cmdline = argv[++i];
        else if (!strcmp(argv[i], "--irqchip")) irqchip = 1;
        else if (!strcmp(argv[i], "--pit")) pit = 1;
        else if (!strcmp(argv[i], "--split-irqchip")) split = 1;
        else if (!strcmp(argv[i], "--irqfds") && i + 1 < argc) irqfds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--times")) times = 1;
        else if (!strcmp(argv[i], "--idle")) idle = 1;
        else if (!strcmp(argv[i], "--coalesce-serial")) coalesce = 1;
        else if (argv[i][0] != '-' && !guest) guest = argv[i];
        else {
            guest = NULL;
            break;
        }
    }
    if (!guest || mem_mib < 2 || mem_mib > 3072 || strlen(cmdline) >= 2048 || (irqchip && split)) {
        fprintf(stderr, "usage: kvm-floor [--mem MIB (2-3072)] [--cmdline STR] [--irqchip | --split-irqchip] [--pit] [--coalesce-serial] [--times] [--idle] GUEST.elf\n");
        return 2;
    }
    double t0 = now_ms();
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint64_t mem_size = mem_mib << 20;
    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    if (split) {
        struct kvm_enable_cap cap = {.cap = KVM_CAP_SPLIT_IRQCHIP, .args = {24}};
        if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0) die("KVM_CAP_SPLIT_IRQCHIP");
    }
    if (irqchip) {
        if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR) < 0) die("KVM_SET_TSS_ADDR");
        if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    }
    if (pit) {
        struct kvm_pit_config pc = {.flags = KVM_PIT_SPEAKER_DUMMY};
        if (ioctl(vm, KVM_CREATE_PIT2, &pc) < 0) die("KVM_CREATE_PIT2");
    }
    /* As a VMM's devices would: an irqfd and a queue-notify ioeventfd each. */
    for (int i = 0; i < irqfds && (irqchip || split); i++) {
        struct kvm_irqfd irq = {.fd = (uint32_t)eventfd(0, EFD_CLOEXEC), .gsi = 5 + (uint32_t)i};
        if (ioctl(vm, KVM_IRQFD, &irq) < 0) die("KVM_IRQFD");
        struct kvm_ioeventfd io = {.addr = 0xd0000050 + 0x1000ULL * i, .len = 4,
                                   .fd = eventfd(0, EFD_CLOEXEC)};
        if (ioctl(vm, KVM_IOEVENTFD, &io) < 0) die("KVM_IOEVENTFD");
    }
    uint64_t entry = load_elf(guest, mem, mem_size);
    write_boot_tables(mem, cmdline);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    set_registers(vcpu, entry);
    struct kvm_coalesced_mmio_ring *ring = NULL;
    if (coalesce) {
        int page = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_PIO) > 0
                       ? ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_MMIO) : 0;
        struct kvm_coalesced_mmio_zone zone = {.addr = 0x3f8, .size = 1, .pio = 1};
        if (page <= 0 || ioctl(vm, KVM_REGISTER_COALESCED_MMIO, &zone) < 0) die("KVM_REGISTER_COALESCED_MMIO");
        ring = (struct kvm_coalesced_mmio_ring *)((uint8_t *)run + (size_t)page * 4096);
    }
    double t1 = now_ms();

    int status = -1;
    while (status < 0) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            die("KVM_RUN");
        }
        drain_coalesced(ring);
        switch (run->exit_reason) {
        case KVM_EXIT_IO: status = port_io(run); break;
        case KVM_EXIT_MMIO:
            if (!run->mmio.is_write) memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
            break;
        case KVM_EXIT_HLT:
            if (idle) {
                fflush(stdout);
                for (;;) pause();
            }
            status = 80;
            break;
        case KVM_EXIT_SHUTDOWN: status = 81; break;
        default:
            fprintf(stderr, "kvm-floor: unhandled exit %u\n", run->exit_reason);
            status = 84;
        }
    }
    fflush(stdout);
    double t2 = now_ms();
    munmap(run, run_size);
    close(vcpu);
    close(vm);
    munmap(mem, mem_size);
    close(kvm);
    double t3 = now_ms();
    if (times) {
        fprintf(stderr, "kvm-floor: setup %.2f ms, run %.2f ms, teardown %.2f ms\n", t1 - t0,
                t2 - t1, t3 - t2);
    }
    return status;
}
