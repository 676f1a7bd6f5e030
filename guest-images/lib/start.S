/* 64-bit entry for the test guests: bulkhead enters here in long mode with paging on and
 * RSI pointing at the Linux zero page. Set our own stack, note the zero page, call guest_main. */
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    lea __stack_top(%rip), %rsp
    mov %rsi, boot_zero_page(%rip)
    call guest_main
    /* guest_main returned: report status 0xfe so the host sees it did not exit properly. */
    mov $0xfe, %al
    out %al, $0xf4
1:  cli
    hlt
    jmp 1b
