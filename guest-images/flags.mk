# Compiler and linker flags shared by every freestanding test guest (this directory's and
# attacks/). Plain integer code: no SSE/AVX, no CET end-branch markers, no red zone, no PIC.
GUEST_DIR := $(dir $(lastword $(MAKEFILE_LIST)))
CC ?= gcc
CFLAGS := -O2 -std=gnu11 -Wall -Wextra -Werror -ffreestanding -fno-builtin -fno-pic -fno-pie \
	-fno-stack-protector -fno-asynchronous-unwind-tables -fcf-protection=none -mno-red-zone \
	-mgeneral-regs-only -mcmodel=small -fno-tree-loop-distribute-patterns
LDFLAGS := -nostdlib -static -no-pie -Wl,--build-id=none -Wl,--no-warn-rwx-segments \
	-Wl,-T,$(GUEST_DIR)lib/guest.ld -Wl,-z,noexecstack
