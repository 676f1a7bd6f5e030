/* The real-mode part of a bzImage: one boot sector and one setup sector (1 KiB), of which only
 * the setup header at 0x1f1 matters to a 64-bit loader (Documentation/arch/x86/boot.rst). */
    .code16
    .section .text
    .org 0x1f1
    .byte 1                      /* setup_sects: one sector follows the boot sector */
    .word 0                      /* root_flags */
    .long 0                      /* syssize (unused by bulkhead) */
    .word 0                      /* ram_size */
    .word 0                      /* vid_mode */
    .word 0                      /* root_dev */
    .word 0xaa55                 /* boot_flag */
    .byte 0xeb, 0x66             /* jump */
    .ascii "HdrS"                /* header */
    .word 0x020c                 /* version 2.12 */
    .long 0                      /* realmode_swtch */
    .word 0                      /* start_sys_seg */
    .word 0                      /* kernel_version */
    .byte 0                      /* type_of_loader */
    .byte 1                      /* loadflags: LOADED_HIGH */
    .word 0                      /* setup_move_size */
    .long 0x100000               /* code32_start */
    .long 0                      /* ramdisk_image */
    .long 0                      /* ramdisk_size */
    .long 0                      /* bootsect_kludge */
    .word 0                      /* heap_end_ptr */
    .byte 0                      /* ext_loader_ver */
    .byte 0                      /* ext_loader_type */
    .long 0                      /* cmd_line_ptr */
    .long 0x37ffffff             /* initrd_addr_max */
    .long 0x200000               /* kernel_alignment */
    .byte 0                      /* relocatable_kernel */
    .byte 0                      /* min_alignment */
    .word 1                      /* xloadflags: XLF_KERNEL_64, entry at +0x200 */
    .long 2047                   /* cmdline_size */
    .org 0x400
