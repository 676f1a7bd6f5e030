/* The application processor's half of the flood guest: it goes from real mode straight to
 * 64-bit mode on the BSP's page tables (the nested test host runs paged 64-bit code at full
 * speed, unpaged code slowly), then keeps one virtqueue full for ever.
 *
 * The BSP copies the bytes between flood_ap_start and flood_ap_end to TRAMPOLINE (0x10000),
 * fills in the parameter block and starts the AP with a startup IPI of vector 0x10. The AP
 * posts descriptor 0 again and again, as fast as the device uses it (filling every free slot,
 * then notifying once), and notifies unless the device asked not to be (VRING_USED_F_NO_NOTIFY while it drains the ring): with a ring that
 * is never empty, a device that serves "while there is more" never returns. */
    .set TRAMPOLINE, 0x10000
    .set QSIZE, 256
    .set MSR_EFER, 0xc0000080
    .section .rodata
    .code16
    .globl flood_ap_start, flood_ap_end, flood_params_offset
flood_ap_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (gdt_desc - flood_ap_start)
    mov %cr4, %eax
    or $0x20, %eax                      /* PAE */
    mov %eax, %cr4
    mov (params - flood_ap_start + 20), %eax
    mov %eax, %cr3                      /* the BSP's page tables */
    mov $MSR_EFER, %ecx
    rdmsr
    or $0x100, %eax                     /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                /* PG | PE */
    mov %eax, %cr0
    ljmpl $0x08, $(lm64 - flood_ap_start + TRAMPOLINE)

    .code64
lm64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $(params - flood_ap_start + TRAMPOLINE), %rbp
    mov 0(%rbp), %esi                   /* struct avail */
    mov 4(%rbp), %edi                   /* struct used */
    mov 8(%rbp), %edx                   /* the QueueNotify register */
    mov 12(%rbp), %ecx                  /* the queue index to write there */
    movl $1, 16(%rbp)                   /* tell the BSP the flood is on */
    cmp $0xffffffff, %ecx
    je 3f                               /* no queue: only keep this CPU busy */
1:  movzwl 2(%rdi), %ebx                /* used.idx */
    movzwl 2(%rsi), %eax                /* avail.idx */
    sub %eax, %ebx
    neg %ebx
    and $0xffff, %ebx                   /* chains in flight: avail.idx - used.idx */
    cmp $QSIZE, %ebx
    jae 2f                              /* the ring is full: notify if the device wants it */
    mov %eax, %ebx
    and $(QSIZE - 1), %ebx
    movw $0, 4(%rsi,%rbx,2)             /* avail.ring[idx % QSIZE] = head 0 */
    inc %eax
    movw %ax, 2(%rsi)                   /* publish (x86 keeps stores in order) */
    jmp 1b                              /* fill every free slot first, as drivers batch */
2:  mfence                              /* the index is visible before used.flags is read */
    testw $1, 0(%rdi)                   /* VRING_USED_F_NO_NOTIFY: the device is draining */
    jnz 1b
    mov %ecx, (%rdx)                    /* otherwise notify, as a driver must */
    jmp 1b
3:  pause
    jmp 3b

    .balign 8
gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: flat data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt - flood_ap_start + TRAMPOLINE
    .balign 4
params:
    .long 0, 0, 0, 0, 0, 0              /* avail, used, notify, queue, running, cr3 */
flood_ap_end:

    .balign 8
flood_params_offset: .quad params - flood_ap_start
