/* msr_probe's #GP handler. The CPU pushed SS, RSP, RFLAGS, CS, RIP and the error code.
 * When the faulting instruction is rdmsr (0f 32) or wrmsr (0f 30), count the fault in
 * gp_faults, step over the 2-byte instruction and return to the next one. Any other #GP is
 * unexpected: end the VM with status 2. */
    .text
    .code64
    .globl gp_entry
gp_entry:
    push %rax
    mov 16(%rsp), %rax          /* the saved RIP (above our RAX and the error code) */
    cmpb $0x0f, (%rax)
    jne 2f
    cmpb $0x32, 1(%rax)
    je 1f
    cmpb $0x30, 1(%rax)
    jne 2f
1:  addq $2, 16(%rsp)
    incl gp_faults(%rip)
    pop %rax
    add $8, %rsp                /* drop the error code */
    iretq
2:  mov $2, %al
    out %al, $0xf4
3:  cli
    hlt
    jmp 3b
