/* PVH entry, as a Linux vmlinux has it: an ELF note names a 32-bit entry point, which bulkhead
 * enters in flat 32-bit protected mode with paging off and EBX pointing at hvm_start_info.
 * Build page tables identity-mapping the first 1 GiB, switch to long mode, note the start info
 * and continue in start.S's guest_entry64. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                      /* name size: "Xen\0" */
    .long 4                      /* descriptor size: a 32-bit address */
    .long 18                     /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32

    .section .text
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    mov %ebx, pvh_info_phys
    mov $__stack_top, %esp

    mov $pvh_pdpt, %eax
    or $3, %eax
    mov %eax, pvh_pml4
    mov $pvh_pd, %eax
    or $3, %eax
    mov %eax, pvh_pdpt
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax               /* present, writable, 2 MiB page */
    mov %eax, pvh_pd(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b

    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax               /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx        /* EFER */
    rdmsr
    or $0x100, %eax              /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax         /* PG | PE */
    mov %eax, %cr0
    lgdt pvh_gdt_desc
    ljmp $0x8, $pvh_start64

    .code64
pvh_start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov pvh_info_phys(%rip), %eax
    mov %rax, boot_pvh_info(%rip)
    jmp guest_entry64

    .section .data
    .balign 8
pvh_gdt:
    .quad 0
    .quad 0x00af9b000000ffff     /* 64-bit code */
    .quad 0x00cf93000000ffff     /* data */
pvh_gdt_desc:
    .word pvh_gdt_desc - pvh_gdt - 1
    .long pvh_gdt
pvh_info_phys:
    .long 0

    .section .bss
    .balign 4096
pvh_pml4: .skip 4096
pvh_pdpt: .skip 4096
pvh_pd:   .skip 4096
