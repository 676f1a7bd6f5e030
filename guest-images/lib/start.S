/* 64-bit entry for the test guests: bulkhead enters here in long mode with paging on and
 * RSI pointing at the Linux zero page. Set our own stack, note the zero page, call guest_main.
 * guest_entry64 is shared with the PVH entry once it has reached long mode. */
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    mov %rsi, boot_zero_page(%rip)
    .globl guest_entry64
guest_entry64:
    lea __stack_top(%rip), %rsp
    call guest_main
    /* guest_main returned: report status 0xfe so the host sees it did not exit properly. */
    mov $0xfe, %al
    out %al, $0xf4
1:  cli
    hlt
    jmp 1b
