/*
 * Boot, descriptor tables and CPL0 entry points of the kvmcolo test guests.
 *
 * Design rule (see PVM-NOTES): under PVM every CPL0 instruction is emulated
 * (~1 us each) while CPL3 runs natively.  So CPL0 does only what needs
 * privilege, and everything that can be computed ahead of time is STATIC DATA
 * laid out by the assembler and linker:
 *   - the identity page tables (4 GiB in 2 MiB pages),
 *   - the GDT including one TSS descriptor per CPU,
 *   - the TSSs (RSP0 per CPU, shared all-zero I/O bitmap),
 *   - the full 256-entry IDT.
 * Handler addresses and TSS bases have to be split into bit fields inside
 * descriptors; the assembler cannot do that with relocatable symbols, so
 * guest.ld exports the pieces (__isr_lo, __tss_b2, ...) as absolute symbols.
 *
 * The BSP path from the PVH entry to CPL3 is ~45 instructions, the AP path
 * from SIPI to CPL3 ~40.  All other setup (ACPI, memory map, command line,
 * AP bring-up logic) runs at CPL3 in C; CPL3 reaches CPL0 only through int3,
 * because SYSCALL and `int n` from CPL3 are broken under PVM.
 */
#include "layout.h"

#define MSR_EFER        0xc0000080
#define EFER_LME        0x100
#define CR4_PAE         0x20
#define CR0_PE          0x1
#define CR0_ET          0x10
#define CR0_PG          0x80000000

/* ------------------------------------------------------------------------ */
/* PVH entry note: Xen ELF note type 18 = XEN_ELFNOTE_PHYS32_ENTRY.          */
/* ------------------------------------------------------------------------ */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz: "Xen\0" */
        .long   4                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .balign 4
        .long   pvh_start32
        .balign 4

/*
 * Switch from 32-bit protected mode (paging off) to long mode and jump to
 * \target in 64-bit code.  Uses no stack.  EFER and CR4 are written whole
 * (we want exactly LME and PAE) instead of read-modify-write: fewer
 * emulated instructions.
 */
.macro ENTER_LONG_MODE target
        movl    $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        movl    $EFER_LME, %eax
        xorl    %edx, %edx
        wrmsr
        movl    $(CR0_PG | CR0_ET | CR0_PE), %eax
        movl    %eax, %cr0
        ljmp    $KCS, $\target
.endm

/* ------------------------------------------------------------------------ */
/* BSP: PVH 32-bit entry. EBX = struct hvm_start_info *. No stack assumed.  */
/* ------------------------------------------------------------------------ */
        .section .text.entry, "ax"
        .code32
        .globl  pvh_start32
pvh_start32:
        movl    %ebx, pvh_start_info
        lgdt    gdt_ptr
        movl    $KDS, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        ENTER_LONG_MODE bsp64

/* AP: reached from the real-mode trampoline through KCS32. */
        .globl  ap_start32
ap_start32:
        /* DS/ES/SS still hold real-mode (64 KiB limit) caches: reload. */
        movl    $KDS, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        ENTER_LONG_MODE ap64

        .code64
bsp64:
        movl    $(kstacks + KSTACK_SIZE), %esp  /* = TSS0.RSP0 */
        lidt    idt_ptr(%rip)
        movl    $TSS_SEL0, %eax
        ltr     %ax

        /*
         * TSC and LAPIC bus frequency from CPUID 0x40000010.  Must be read
         * at CPL0: under PVM, CPUID at CPL3 returns the host's values.
         * Accept the leaf only if the hypervisor range reports it.
         */
        movl    $0x40000000, %eax
        cpuid
        subl    $0x40000010, %eax
        cmpl    $0xffef, %eax           /* max leaf in [0x40000010, 0x4000ffff] */
        ja      1f
        movl    $0x40000010, %eax
        cpuid
        movl    %eax, boot_tsc_khz(%rip)
        movl    %ebx, boot_bus_khz(%rip)
1:
        /*
         * Mask the legacy PIC and LINT0 before interrupts are ever enabled:
         * KVM resets the BSP's LVT0 to ExtINT with a live PIC (vector base
         * 0), so a PIT tick would otherwise arrive as "exception" 0..15.
         */
        movb    $0xff, %al
        outb    %al, $0x21
        outb    %al, $0xa1
        movl    $LAPIC_BASE, %ecx
        movl    $(0x100 | SPURIOUS_VECTOR), LAPIC_SVR(%rcx)     /* software enable */
        movl    $APIC_LVT_MASKED, LAPIC_LVT0(%rcx)
        movl    LAPIC_ID(%rcx), %eax
        shrl    $24, %eax
        movl    %eax, bsp_apic_id(%rip)

        xorl    %edi, %edi              /* cpu 0 */
        movl    $user_start, %esi
        jmp     to_user

ap64:
        /* The BSP publishes our CPU index and waits until we are at CPL3. */
        movl    ap_boot_cpu(%rip), %edi
        leal    1(%rdi), %eax
        shll    $KSTACK_SHIFT, %eax
        addl    $kstacks, %eax
        movl    %eax, %esp              /* = TSSn.RSP0 */
        lidt    idt_ptr(%rip)
        movl    %edi, %eax
        shll    $4, %eax
        addl    $TSS_SEL0, %eax
        ltr     %ax
        movl    $LAPIC_BASE, %ecx
        movl    $(0x100 | SPURIOUS_VECTOR), LAPIC_SVR(%rcx)
        movl    $APIC_LVT_MASKED, LAPIC_LVT0(%rcx)
        movl    $ap_user_start, %esi
        /* fall through */

/*
 * Drop to CPL3: %edi = cpu index (also the first C argument), %esi = entry.
 * IOPL stays 0 (PVM forces it anyway); port I/O at CPL3 goes through the TSS
 * I/O bitmap.  IF=1: interrupts are enabled from here on.  The user stack
 * starts 8 below its top so the entry sees a call-like alignment.
 */
to_user:
        movl    %edi, %eax
        shll    $USTACK_SHIFT, %eax
        addl    $(ustacks + USTACK_SIZE - 8), %eax
        pushq   $UDS
        pushq   %rax
        pushq   $0x202
        pushq   $UCS
        pushq   %rsi
        iretq

/* ------------------------------------------------------------------------ */
/* CPL0 handlers                                                            */
/* ------------------------------------------------------------------------ */

/*
 * Exceptions and unexpected vectors.  Stack: vector, error code, then the
 * CPU's frame (rip, cs, rflags, rsp, ss).  Report and exit with status 3.
 */
isr_common:
        movq    %rsp, %rdi
        movq    %cr2, %rsi
        andq    $-16, %rsp
        call    cpl0_exception
2:      cli
        hlt
        jmp     2b

/*
 * int3: the system call gate (DPL3).  Number in %eax, arguments in %rdi and
 * %rsi; only %rax is clobbered.  int3 executed at CPL0 is a real breakpoint.
 */
int3_entry:
        testb   $3, 8(%rsp)             /* RPL of the interrupted CS */
        jz      9f
        cmpl    $SYS_APIC_WRITE, %eax
        je      2f
        testl   %eax, %eax              /* SYS_WAIT_IRQ */
        jz      3f
        /*
         * SYS_WAIT_CHANGE: sleep only if *%rdi == %rsi.  The compare runs
         * with IF=0 (interrupt gate), so an interrupt that bumped the
         * counter after CPL3 read it is either already counted (no sleep)
         * or still pending and ends the hlt: no lost wake-up.
         */
        cmpl    $SYS_WAIT_CHANGE, %eax
        jne     1f
        cmpq    %rsi, (%rdi)
        jne     1f
3:      sti                             /* sti shadow: hlt runs before any IRQ */
        hlt
        cli
1:      iretq
2:      movl    %edi, %eax
        andl    $0xff0, %eax
        orl     $LAPIC_BASE, %eax
        movl    %esi, (%rax)
        iretq
9:      pushq   $0
        pushq   $3
        jmp     isr_common

/*
 * LAPIC timer: bump this CPU's tick counter (struct kcpu at the base of the
 * kernel stack, found by masking %rsp) and EOI.  8 instructions.
 */
timer_isr:
        pushq   %rax
        movq    %rsp, %rax
        andq    $-KSTACK_SIZE, %rax
        incq    (%rax)
        movl    $(LAPIC_BASE + LAPIC_EOI), %eax
        movl    $0, (%rax)
        popq    %rax
        iretq

/*
 * Device interrupts (vectors DEV_VECTOR_BASE..+DEV_VECTORS, edge-triggered
 * from the IOAPIC).  The stub pushed %rax and loaded the vector into %eax.
 * Count per vector and in total, EOI, return: 7 instructions.  CPL3 does
 * the real work: it compares the counts with what it saw last (reads and
 * acknowledges the device's InterruptStatus only when its count moved) and
 * sleeps with SYS_WAIT_CHANGE on dev_irq_total.
 */
dev_isr:
        incq    dev_irq_count - DEV_VECTOR_BASE * 8(, %rax, 8)
        incq    dev_irq_total(%rip)
        movl    $(LAPIC_BASE + LAPIC_EOI), %eax
        movl    $0, (%rax)
        popq    %rax
        iretq

/*
 * 256 entry stubs, 16 bytes each, in their own 4 KiB-aligned section so the
 * static IDT can use __isr_lo + 16 * vector (no carry into the middle 16 bits).
 */
        .section .text.isr, "ax"
        .balign 4096
        .globl  isr_stubs
isr_stubs:
        .set    vec, 0
        .rept   256
0:
        .if vec == 3
        jmp     int3_entry
        .elseif vec == TIMER_VECTOR
        jmp     timer_isr
        .elseif vec == SPURIOUS_VECTOR
        iretq                           /* spurious: no EOI */
        .elseif (vec >= DEV_VECTOR_BASE) && (vec < DEV_VECTOR_BASE + DEV_VECTORS)
        pushq   %rax
        movl    $vec, %eax
        jmp     dev_isr
        .else
        .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        /* the CPU pushed an error code */
        .else
        .byte   0x6a, 0                 /* push $0: fake error code */
        .endif
        .if vec < 0x80
        .byte   0x6a, vec               /* push $vec (imm8) */
        .else
        .byte   0x68                    /* push $vec (imm32) */
        .long   vec
        .endif
        jmp     isr_common
        .endif
        .fill   0b + 16 - ., 1, 0xcc
        .set    vec, vec + 1
        .endr

/* ------------------------------------------------------------------------ */
/* AP real-mode trampoline, its own PT_LOAD at 0x8000 (SIPI vector 0x08).    */
/* ------------------------------------------------------------------------ */
        .section .trampoline, "ax"
        .code16
        .globl  ap_trampoline
ap_trampoline:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        lgdtl   ap_gdt_ptr              /* the real GDT, it has a 32-bit code segment */
        movl    %cr0, %eax
        orb     $CR0_PE, %al
        movl    %eax, %cr0
        ljmpl   $KCS32, $ap_start32
        .balign 8
ap_gdt_ptr:
        .word   gdt_end - gdt - 1
        .long   gdt
        .code64

/* ------------------------------------------------------------------------ */
/* Static data                                                              */
/* ------------------------------------------------------------------------ */
        .section .data.boot, "aw"
        .balign 8
        /* Written at CPL0 during boot, read by the C runtime at CPL3. */
        .globl  pvh_start_info, boot_tsc_khz, boot_bus_khz, bsp_apic_id, ap_boot_cpu
pvh_start_info: .long 0
boot_tsc_khz:   .long 0
boot_bus_khz:   .long 0
bsp_apic_id:    .long 0
ap_boot_cpu:    .long 0

        .balign 16
gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08 KCS: 64-bit code, DPL0 */
        .quad   0x00cf92000000ffff      /* 0x10 KDS: data, DPL0 */
        .quad   0x00cf9a000000ffff      /* 0x18 KCS32: 32-bit code, DPL0 (AP boot) */
        .quad   0x00cff2000000ffff      /* 0x20 UDS: data, DPL3 */
        .quad   0x00affa000000ffff      /* 0x28 UCS: 64-bit code, DPL3 */
        /* 0x30 + 16n: 64-bit TSS of CPU n (base bytes from guest.ld). */
        .set    cpu, 0
        .rept   MAX_CPUS
        .word   (MAX_CPUS - cpu) * TSS_STRIDE + IOPB_BYTES     /* limit: incl. 0xff byte */
        .word   __tss_lo + cpu * TSS_STRIDE
        .byte   __tss_b2
        .byte   0x89                    /* present, DPL0, available 64-bit TSS */
        .byte   0                       /* limit 19:16 = 0, G = 0 */
        .byte   __tss_b3
        .long   0
        .long   0
        .set    cpu, cpu + 1
        .endr
gdt_end:
        .if (MAX_CPUS * TSS_STRIDE + IOPB_BYTES) > 0xffff
        .error "TSS limit does not fit in 16 bits"
        .endif

        .balign 8
gdt_ptr:                                /* also read by 32-bit lgdt (6 bytes) */
        .word   gdt_end - gdt - 1
        .quad   gdt
        .balign 8
idt_ptr:
        .word   256 * 16 - 1
        .quad   idt

        .balign 16
idt:
        .set    vec, 0
        .rept   256
        .word   __isr_lo + vec * 16
        .word   KCS
        .byte   0                       /* no IST */
        .if vec == 3
        .byte   0xee                    /* P, DPL3 interrupt gate: CPL3 may int3 */
        .else
        .byte   0x8e                    /* P, DPL0 interrupt gate (IF cleared) */
        .endif
        .word   __isr_mid
        .long   0
        .long   0
        .set    vec, vec + 1
        .endr

/*
 * TSSs.  TSS n lives at tss_area + TSS_STRIDE * n; its I/O map base points
 * at the shared bitmap right after the last TSS.  Under PVM, IOPL is forced
 * to 0, so this bitmap is the only way CPL3 can do port I/O (serial, debug
 * exit, port 0x80).  tss_area is 4 KiB-aligned so the descriptors' low base
 * word never carries.
 */
        .section .data.tss, "aw"
        .balign 4096
        .globl  tss_area
tss_area:
        .set    cpu, 0
        .rept   MAX_CPUS
        .long   0
        .quad   kstacks + (cpu + 1) * KSTACK_SIZE       /* RSP0 */
        .quad   0, 0                    /* RSP1, RSP2 */
        .quad   0                       /* reserved */
        .quad   0, 0, 0, 0, 0, 0, 0     /* IST1..7 */
        .quad   0                       /* reserved */
        .word   0                       /* reserved */
        .word   (MAX_CPUS - cpu) * TSS_STRIDE           /* I/O map base */
        .fill   TSS_STRIDE - 104, 1, 0
        .set    cpu, cpu + 1
        .endr
        .if MAX_CPUS * TSS_STRIDE > 4096
        .error "TSS area must fit in 4 KiB"
        .endif
        .fill   IOPB_BYTES, 1, 0        /* every port allowed */
        .byte   0xff                    /* terminator */

/*
 * Identity map of the first 4 GiB with 2 MiB pages, built by the assembler
 * (zero CPL0 instructions).  P|RW|US everywhere so CPL3 can touch everything,
 * including MMIO; 3-4 GiB (the MMIO hole) is additionally PWT|PCD.
 */
        .section .data.pt, "aw"
        .balign 4096
pml4:
        .quad   pdpt + 0x7
        .fill   511, 8, 0
pdpt:
        .quad   pd + 0x0000 + 0x7
        .quad   pd + 0x1000 + 0x7
        .quad   pd + 0x2000 + 0x7
        .quad   pd + 0x3000 + 0x7
        .fill   508, 8, 0
pd:
        .set    addr, 0
        .rept   1536
        .quad   addr | 0x87             /* P RW US PS */
        .set    addr, addr + 0x200000
        .endr
        .rept   512
        .quad   addr | 0x9f             /* P RW US PWT PCD PS */
        .set    addr, addr + 0x200000
        .endr

/* Device interrupt counts (cleared with .bss at CPL3 before any routing). */
        .section .bss
        .balign 64
        .globl  dev_irq_count, dev_irq_total
dev_irq_count:
        .skip   DEV_VECTORS * 8
dev_irq_total:
        .skip   8

/* Stacks: not file-backed, not cleared (struct kcpu is cleared at CPL3). */
        .section .stacks, "aw", @nobits
        .balign KSTACK_SIZE
        .globl  kstacks
kstacks:
        .skip   MAX_CPUS * KSTACK_SIZE
        .balign USTACK_SIZE
        .globl  ustacks
ustacks:
        .skip   MAX_CPUS * USTACK_SIZE

        .section .note.GNU-stack, "", @progbits
