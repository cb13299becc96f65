/* Multiboot (v1) entry of the fastsnap tiny guest: 32-bit protected mode, no paging. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, want memory info */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .globl _start
_start:
    cli
    cld
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  movw $0x10, %cx
    movw %cx, %ds
    movw %cx, %es
    movw %cx, %ss
    movw %cx, %fs
    movw %cx, %gs
    movl $stack_top, %esp
    pushl %ebx              /* multiboot info */
    pushl %eax              /* multiboot magic */
    call tiny_main
2:  cli
    hlt
    jmp 2b

/* Interrupt stubs: vectors 0-31 are faults, 32-47 the two 8259s. */
.macro stub n
    .globl isr\n
isr\n:
    pushl $\n
    jmp isr_common
.endm
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    stub \n
    .endr
/* Vectors with a CPU-pushed error code: drop it, then push the vector. */
.macro stub_err n
    .globl isr\n
isr\n:
    addl $4, %esp
    pushl $\n
    jmp isr_common
.endm
    .irp n, 8,10,11,12,13,14,17
    stub_err \n
    .endr

/* Never returns: see tiny_interrupt() in tiny.c. */
isr_common:
    call tiny_interrupt     /* the vector is the argument */
    movl $stack_top, %esp
    call tiny_loop
3:  cli
    hlt
    jmp 3b

    .section .rodata
    .align 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF  /* 0x08: flat 32-bit code */
    .quad 0x00CF92000000FFFF  /* 0x10: flat data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

    .bss
    .align 4096
    .align 16
    .space 16384
stack_top:
