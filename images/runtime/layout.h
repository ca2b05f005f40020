/*
 * Constants shared by boot.S, guest.ld users and the C runtime.
 * Only #defines here: this file is included from assembly too.
 */
#ifndef KVMCOLO_LAYOUT_H
#define KVMCOLO_LAYOUT_H

/* Static per-CPU resources (stacks, TSS, GDT slots) exist for this many CPUs. */
#define MAX_CPUS        32

/*
 * Kernel (CPL0) stacks: one per CPU, KSTACK_SIZE-aligned, so CPL0 code finds
 * its per-CPU block (struct kcpu, at the lowest address of the stack) with a
 * single AND of %rsp.  CPL0 only runs tiny handlers, 8 KiB is plenty.
 */
#define KSTACK_SHIFT    13
#define KSTACK_SIZE     (1 << KSTACK_SHIFT)
/* User (CPL3) stacks: one per CPU; this_cpu() is derived from %rsp. */
#define USTACK_SHIFT    15
#define USTACK_SIZE     (1 << USTACK_SHIFT)

/* GDT selectors (see boot.S). */
#define KCS             0x08    /* 64-bit kernel code */
#define KDS             0x10    /* kernel data */
#define KCS32           0x18    /* 32-bit kernel code, used by the AP trampoline */
#define UDS             0x23    /* user data, RPL 3 */
#define UCS             0x2b    /* 64-bit user code, RPL 3 */
#define TSS_SEL0        0x30    /* CPU n uses TSS_SEL0 + 16 * n */

/*
 * TSS area: MAX_CPUS 104-byte TSSs at a stride of TSS_STRIDE, followed by ONE
 * shared I/O permission bitmap (all zeros = every port allowed) and its 0xFF
 * terminator.  Each TSS's I/O map base points at that shared bitmap.
 */
#define TSS_STRIDE      128
#define IOPB_BYTES      8192

/* Interrupt vectors. */
#define TIMER_VECTOR    0x20
#define SPURIOUS_VECTOR 0xff
/*
 * Device interrupts: GSI n is routed (by ioapic_route) to vector
 * DEV_VECTOR_BASE + n.  48 GSIs cover the VMM's single 24-pin IOAPIC and
 * QEMU microvm's second IOAPIC (GSIs 24..47).  Their CPL0 stub only counts
 * and EOIs; CPL3 looks at the counts (see dev_isr in boot.S).
 */
#define DEV_VECTOR_BASE 0x30
#define DEV_VECTORS     48

/* "System calls": int3 from CPL3 with the number in %rax (see boot.S). */
#define SYS_WAIT_IRQ    0       /* sti; hlt; cli: sleep until an interrupt */
#define SYS_APIC_WRITE  1       /* write LAPIC register %rdi (offset) := %esi */
#define SYS_NOP         2       /* any other number: plain round trip */
#define SYS_WAIT_CHANGE 3       /* sleep like SYS_WAIT_IRQ, but only if the u64
                                   at %rdi still equals %rsi (checked with
                                   interrupts off: no lost wake-up) */

/* xAPIC MMIO. */
#define LAPIC_BASE      0xfee00000
#define LAPIC_ID        0x020
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT0      0x350
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define APIC_LVT_MASKED 0x10000

/* AP real-mode trampoline: SIPI vector 0x08 -> physical 0x8000. */
#define AP_TRAMPOLINE   0x8000
#define AP_SIPI_VECTOR  (AP_TRAMPOLINE >> 12)

/* Ports. */
#define PORT_COM1       0x3f8
#define PORT_DEBUG_EXIT 0xf4
#define PORT_POST       0x80

#endif
