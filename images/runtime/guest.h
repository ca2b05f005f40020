/*
 * CPL3 API of the kvmcolo test guests.
 *
 * A workload defines main() and lists its command-line keys with
 * GUEST_PARAMS(...).  main() runs at CPL3 on the BSP after the runtime has
 * parsed the PVH start info, the memory map, the ACPI MADT and the command
 * line; its return value is the exit status.
 *
 * Exit statuses: 0 ok, 1 self-check failure, 2 bad parameters, 3 panic.
 */
#ifndef KVMCOLO_GUEST_H
#define KVMCOLO_GUEST_H

#include <stdarg.h>
#include "layout.h"

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long size_t;

#define EXIT_OK         0
#define EXIT_FAIL       1
#define EXIT_BADARGS    2
#define EXIT_PANIC      3

/* Accepted command-line keys of the workload (NULL-terminated list). */
extern const char *const guest_params[];
#define GUEST_PARAMS(...) const char *const guest_params[] = { __VA_ARGS__, 0 }

int main(void);

/* ---- console (COM1), line-atomic across CPUs ---- */
void putc(char c);
void puts(const char *s);                       /* appends '\n' */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int snprintf(char *buf, size_t size, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* ---- exit ---- */
void guest_exit(int status) __attribute__((noreturn));
void panic(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

/* ---- command line: space-separated key=value words ---- */
const char *cmdline(void);
/* Decimal or 0x hex, optional K/M/G suffix (x1024); bad value -> exit 2. */
u64 arg_u64(const char *key, u64 dflt);
const char *arg_str(const char *key, const char *dflt);
/* The number at *pp (before end): decimal or 0x hex, with an optional K/M/G
 * suffix (x1024) if `suffix`.  Advances *pp past it; 0, or -1 if malformed. */
int parse_u64(const char **pp, const char *end, u64 *out, int suffix);
/* The next space-separated word at *pp (which moves to its end), or NULL. */
const char *cmdline_word(const char **pp);

/* ---- machine ---- */
int ncpus(void);
int this_cpu(void);
u64 tsc_khz(void);
u64 bus_khz(void);
u64 mem_mib(void);                              /* RAM in the memory map */
/* Free RAM: [_end rounded up to a page, end of the RAM region holding it). */
u64 free_ram_start(void);
u64 free_ram_end(void);

/* ---- SMP ----
 * Starts every other CPU in the MADT (INIT-SIPI-SIPI; the ICR writes are
 * SYS_APIC_WRITE calls, the rest is CPL3 code).  Each AP runs its CPL0 boot
 * (long mode, GDT, TSS, IDT) then fn(cpu) at CPL3; if fn returns the AP
 * sleeps.  Returns once every AP is running fn; prints
 * "guest: cpu N did not start" and exits 3 after a 100 ms timeout.
 */
void smp_start(void (*fn)(int cpu));

/* ---- time and interrupts ---- */
static inline u64 rdtsc(void)
{
        u32 lo, hi;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
void delay_us(u64 us);
/* Periodic LAPIC timer on this CPU at hz (0 = stop); vector TIMER_VECTOR. */
void lapic_timer_periodic(u32 hz);
/* Timer interrupts taken so far by cpu. */
u64 cpu_ticks(int cpu);

/* ---- "system calls": int3 with the number in %rax ---- */
static inline u64 syscall2(u64 nr, u64 a0, u64 a1)
{
        __asm__ volatile("int3" : "+a"(nr) : "D"(a0), "S"(a1) : "memory");
        return nr;
}
/* Sleep (hlt at CPL0) until the next interrupt. */
static inline void wait_irq(void) { syscall2(SYS_WAIT_IRQ, 0, 0); }
static inline void apic_write(u32 reg, u32 val) { syscall2(SYS_APIC_WRITE, reg, val); }

/*
 * ---- device interrupts ----
 * boot.S counts every device vector (DEV_VECTOR_BASE + GSI) and all of them
 * together; the counters live in RAM, so CPL3 reads them for free.
 */
extern volatile u64 dev_irq_count[DEV_VECTORS], dev_irq_total;
static inline u64 irq_total(void) { return dev_irq_total; }
static inline u64 irq_count(u32 gsi) { return gsi < DEV_VECTORS ? dev_irq_count[gsi] : 0; }
/*
 * Race-free sleep: take seen = irq_total(), look for work, and if there is
 * none call wait_irq_since(seen).  It returns at once if a device interrupt
 * arrived in between, else after the next interrupt of any kind (timer too).
 */
static inline void wait_irq_since(u64 seen)
{
        syscall2(SYS_WAIT_CHANGE, (u64)&dev_irq_total, seen);
}
/* IOAPICs from the ACPI MADT (default: one at 0xFEC00000, GSI base 0). */
int ioapic_count(void);
u64 ioapic_base(int i);
u32 ioapic_gsi_base(int i);
/*
 * Routes gsi to vector DEV_VECTOR_BASE + gsi on the BSP: edge-triggered,
 * active high, fixed delivery, physical destination.  CPL3 programs the
 * IOAPIC directly (its MMIO is mapped with the U bit).  Returns the vector,
 * or -1 if no IOAPIC has that pin or gsi >= DEV_VECTORS.
 */
int ioapic_route(u32 gsi);

/* ---- free RAM allocator ----
 * Bump allocator over [free_ram_start, free_ram_end), 4 KiB-aligned,
 * zeroed, never freed (device rings and buffers live as long as the guest).
 * Do not mix with workloads that use free_ram_start() directly.  Panics
 * when RAM runs out.
 */
void *ram_alloc(u64 bytes);

/* ---- randomness ----
 * RDRAND (at CPL3 it runs natively under PVM); falls back to mixing RDTSC
 * when the CPU lacks it or it keeps failing.  Not for cryptography.
 */
u64 random_u64(void);

/* ---- port I/O: allowed at CPL3 by the TSS I/O bitmap ---- */
static inline void outb(u16 port, u8 v)
{
        __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline u8 inb(u16 port)
{
        u8 v;
        __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}

/* ---- libc bits ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

#endif
