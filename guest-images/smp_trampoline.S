/* Real-mode start-up code for application processors. The BSP copies the bytes between
 * ap_tramp_start and ap_tramp_end to TRAMPOLINE (0x10000) and points each AP there with a
 * startup IPI of vector 0x10, so the AP starts at CS=0x1000, IP=0.
 *
 * Each AP reads its APIC id from CPUID, prints "vcpu N checked in" on the serial port,
 * stores N+1 in the flag word at offset ap_flag, and halts. The BSP starts one AP at a time,
 * so the APs never share the port or the stack. */
    .section .rodata
    .code16
    .globl ap_tramp_start, ap_tramp_end, ap_flag_offset
ap_tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0xff0, %sp
    mov $1, %eax
    cpuid
    shr $24, %ebx
    mov %bx, %bp                       /* bp = APIC id */

    mov $(msg_head - ap_tramp_start), %si
    call print_string
    mov %bp, %ax
    call print_decimal
    mov $(msg_tail - ap_tramp_start), %si
    call print_string

    mov %bp, %ax
    inc %ax
    mov %ax, (ap_flag - ap_tramp_start)
1:  cli
    hlt
    jmp 1b

/* Prints the NUL-terminated string at DS:SI. */
print_string:
    lodsb
    test %al, %al
    jz 2f
    call print_char
    jmp print_string
2:  ret

/* Prints AX (below 1000) in decimal. */
print_decimal:
    xor %cx, %cx
    mov $10, %bx
3:  xor %dx, %dx
    div %bx
    push %dx
    inc %cx
    test %ax, %ax
    jnz 3b
4:  pop %ax
    add $'0', %al
    call print_char
    loop 4b
    ret

/* Prints AL once the UART's transmit register is empty. */
print_char:
    mov %al, %ah
    mov $0x3fd, %dx
5:  in %dx, %al
    test $0x20, %al
    jz 5b
    mov $0x3f8, %dx
    mov %ah, %al
    out %al, %dx
    ret

msg_head: .asciz "vcpu "
msg_tail: .asciz " checked in\n"
    .balign 4
ap_flag: .long 0
ap_tramp_end:

    .balign 8
ap_flag_offset: .quad ap_flag - ap_tramp_start
