"""cffi build script for kvmcolo._kvm (API mode).

Every struct below is compiled against the system's <linux/kvm.h>: fields we
name are checked by the C compiler, `...;` lets the compiler fill in the rest
of the layout, and every ioctl number and constant is taken from the headers
(`#define NAME ...`).  Nothing here is an offset typed by hand.

Structs the VMM only saves and restores as a whole (events, debug registers,
irqchip, PIT state) are declared opaque: their size comes from the compiler
and their bytes are carried as blobs.
"""

import cffi

ffibuilder = cffi.FFI()

IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR
KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_SET_CPUID2
KVM_GET_CPUID2 KVM_GET_MSRS KVM_SET_MSRS KVM_GET_FPU KVM_SET_FPU KVM_GET_LAPIC
KVM_SET_LAPIC KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_XSAVE KVM_SET_XSAVE
KVM_GET_XSAVE2 KVM_GET_XCRS KVM_SET_XCRS KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS KVM_GET_IRQCHIP KVM_SET_IRQCHIP
KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK KVM_SET_CLOCK KVM_GET_DIRTY_LOG
KVM_CLEAR_DIRTY_LOG KVM_ENABLE_CAP KVM_IOEVENTFD KVM_IRQFD KVM_SIGNAL_MSI
KVM_GET_TSC_KHZ KVM_SET_TSC_KHZ KVM_KVMCLOCK_CTRL
""".split()

CONSTANTS = """
KVM_API_VERSION
KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR
KVM_CAP_EXT_CPUID KVM_CAP_PIT2 KVM_CAP_IMMEDIATE_EXIT KVM_CAP_NR_VCPUS
KVM_CAP_MAX_VCPUS KVM_CAP_IOEVENTFD KVM_CAP_IRQFD KVM_CAP_IRQFD_RESAMPLE
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 KVM_CAP_XSAVE KVM_CAP_XSAVE2 KVM_CAP_XCRS
KVM_CAP_DEBUGREGS KVM_CAP_VCPU_EVENTS KVM_CAP_ADJUST_CLOCK KVM_CAP_GET_TSC_KHZ
KVM_CAP_MP_STATE KVM_CAP_TSC_CONTROL KVM_CAP_SYNC_MMU KVM_CAP_NR_MEMSLOTS
KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_SIGNAL_MSI KVM_CAP_IRQ_ROUTING
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE KVM_DIRTY_LOG_INITIALLY_SET
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_INIT_RECEIVED
KVM_MP_STATE_HALTED KVM_MP_STATE_SIPI_RECEIVED
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_IRQFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_RESAMPLE
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX
KVM_INTERNAL_ERROR_DELIVERY_EV KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
KVM_CPUID_FLAG_SIGNIFCANT_INDEX
KVM_RUN_EXIT_UNION_OFFSET
""".split()

# Every exit reason, so an unexpected one can be reported by name.
EXIT_REASONS = """
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL
KVM_EXIT_DEBUG KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN
KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR KVM_EXIT_SET_TPR
KVM_EXIT_TPR_ACCESS KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_OSI
KVM_EXIT_PAPR_HCALL KVM_EXIT_WATCHDOG KVM_EXIT_EPR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_IOAPIC_EOI KVM_EXIT_HYPERV KVM_EXIT_X86_RDMSR KVM_EXIT_X86_WRMSR
KVM_EXIT_DIRTY_RING_FULL KVM_EXIT_AP_RESET_HOLD KVM_EXIT_X86_BUS_LOCK
""".split()

ffibuilder.cdef(
    """
    /* ---- structs the VMM reads or writes field by field ---- */
    struct kvm_userspace_memory_region {
        uint32_t slot; uint32_t flags; uint64_t guest_phys_addr;
        uint64_t memory_size; uint64_t userspace_addr;
    };
    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
        uint64_t rip, rflags;
    };
    struct kvm_segment {
        uint64_t base; uint32_t limit; uint16_t selector;
        uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
    };
    struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
        unsigned long long interrupt_bitmap[...];
    };
    struct kvm_cpuid_entry2 {
        uint32_t function, index, flags, eax, ebx, ecx, edx; ...;
    };
    struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };
    struct kvm_pit_config { uint32_t flags; ...; };
    struct kvm_irq_level { union { uint32_t irq; int32_t status; }; uint32_t level; };
    struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
    struct kvm_msrs { uint32_t nmsrs; struct kvm_msr_entry entries[]; ...; };
    struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
    struct kvm_mp_state { uint32_t mp_state; };
    struct kvm_lapic_state { char regs[...]; };
    struct kvm_xcr { uint32_t xcr; uint32_t reserved; uint64_t value; };
    struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[...]; ...; };
    struct kvm_xsave { uint32_t region[...]; ...; };
    struct kvm_fpu { uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx;
                     uint64_t last_ip; uint64_t last_dp; uint8_t xmm[16][16];
                     uint32_t mxcsr; ...; };
    struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };
    struct kvm_irqchip { uint32_t chip_id; ...; };
    struct kvm_dirty_log { uint32_t slot; uint32_t padding1;
                           union { void *dirty_bitmap; uint64_t padding2; }; };
    struct kvm_clear_dirty_log { uint32_t slot; uint32_t num_pages; uint64_t first_page;
                                 union { void *dirty_bitmap; uint64_t padding2; }; };
    struct kvm_enable_cap { uint32_t cap; uint32_t flags; unsigned long long args[4]; ...; };
    struct kvm_ioeventfd { uint64_t datamatch; uint64_t addr; uint32_t len;
                           int32_t fd; uint32_t flags; ...; };
    struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...; };
    struct kvm_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data;
                     uint32_t flags; ...; };

    /* ---- state carried as opaque blobs ---- */
    struct kvm_vcpu_events { ...; };
    struct kvm_debugregs { ...; };
    struct kvm_pit_state2 { ...; };

    /* ---- the shared kvm_run page: the named members of its exit union are
       given C names in the source below (anonymous structs cannot be partial
       in cffi), all at KVM_RUN_EXIT_UNION_OFFSET from the start ---- */
    struct kvm_run {
        uint8_t request_interrupt_window; uint8_t immediate_exit;
        uint32_t exit_reason; uint8_t ready_for_interrupt_injection;
        uint8_t if_flag; uint64_t cr8; uint64_t apic_base; ...;
    };
    typedef struct { uint8_t direction; uint8_t size; uint16_t port;
                     uint32_t count; uint64_t data_offset; ...; } kvm_exit_io_t;
    typedef struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len;
                     uint8_t is_write; ...; } kvm_exit_mmio_t;
    typedef struct { uint32_t suberror; uint32_t ndata; unsigned long long data[16]; ...; }
        kvm_exit_internal_t;
    typedef struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; ...; }
        kvm_exit_fail_entry_t;
    typedef struct { uint32_t type; uint32_t ndata; ...; } kvm_exit_system_event_t;
    typedef struct { uint32_t exception; uint32_t error_code; } kvm_exit_ex_t;

    /* ---- helpers (C source below) ---- */
    long kvmcolo_ioctl(int fd, unsigned long request, void *arg);
    long kvmcolo_ioctl_int(int fd, unsigned long request, unsigned long arg);
    int kvmcolo_install_kick_handler(void);
    void *kvmcolo_map_anonymous(size_t size);
    int kvmcolo_tap_attach(int fd, const char *name, int vnet_hdr);
    int kvmcolo_unmap(void *addr, size_t size);
    size_t kvmcolo_bitmap_pages(const uint64_t *bitmap, size_t nwords, uint32_t *out);
    void kvmcolo_bitmap_or(uint64_t *dst, const uint64_t *src, size_t nwords);
    void kvmcolo_gather_pages(const uint8_t *base, const uint32_t *pages, size_t n, uint8_t *dst);
    void kvmcolo_scatter_pages(uint8_t *base, const uint32_t *pages, size_t n, const uint8_t *src);
    size_t kvmcolo_nonzero_pages(const uint8_t *base, size_t npages, uint32_t *out);
    void kvmcolo_copy_pages(uint8_t *dst, const uint8_t *src, const uint32_t *pages, size_t n);
    void kvmcolo_bitmap_set_pages(uint64_t *bitmap, const uint32_t *pages, size_t n);
    """
    + "".join(f"#define {name} ...\n" for name in IOCTLS + CONSTANTS + EXIT_REASONS)
)

ffibuilder.set_source(
    "kvmcolo._kvm",
    r"""
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>
#include <net/if.h>
#include <linux/if_tun.h>

typedef __typeof__(((struct kvm_run *)0)->io) kvm_exit_io_t;
typedef __typeof__(((struct kvm_run *)0)->mmio) kvm_exit_mmio_t;
typedef __typeof__(((struct kvm_run *)0)->internal) kvm_exit_internal_t;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) kvm_exit_fail_entry_t;
typedef __typeof__(((struct kvm_run *)0)->system_event) kvm_exit_system_event_t;
typedef __typeof__(((struct kvm_run *)0)->ex) kvm_exit_ex_t;
#define KVM_RUN_EXIT_UNION_OFFSET offsetof(struct kvm_run, io)

/* ioctl returning -errno on failure, so errno never has to survive a trip
   through Python (cffi calls release the GIL; KVM_RUN blocks for long). */
long kvmcolo_ioctl(int fd, unsigned long request, void *arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

long kvmcolo_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* The vCPU "kick": a real-time signal with an empty handler installed
   without SA_RESTART.  Delivered to a thread inside KVM_RUN it makes KVM_RUN
   return -EINTR; Python's own signal machinery is not involved (Python only
   runs handlers in the main thread). Returns the signal number. */
static void kick_handler(int sig) { (void)sig; }

int kvmcolo_install_kick_handler(void)
{
    int sig = SIGRTMIN + 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) < 0)
        return -errno;
    return sig;
}

/* Guest RAM: anonymous, private, not reserved up front (a 4 GiB guest that
   touches 10 MiB costs 10 MiB). */
void *kvmcolo_map_anonymous(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* Attach an open /dev/net/tun fd to the tap interface `name` (created if it
   does not exist yet): TUNSETIFF with IFF_TAP | IFF_NO_PI.  struct ifreq's
   unions are filled here, by the compiler, rather than laid out in Python. */
int kvmcolo_tap_attach(int fd, const char *name, int vnet_hdr)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (vnet_hdr ? IFF_VNET_HDR : 0);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        return -errno;
    return 0;
}

int kvmcolo_unmap(void *addr, size_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

/* ---- dirty-page helpers: whole-buffer loops that Python would run per bit
   or per page (see benchmarks/bench_checkpoint.py for the measured gain) ---- */

/* Indices of the set bits of a KVM dirty bitmap (64-bit little-endian
   words), in ascending order.  `out` must hold 64 * nwords entries. */
size_t kvmcolo_bitmap_pages(const uint64_t *bitmap, size_t nwords, uint32_t *out)
{
    size_t n = 0;
    for (size_t w = 0; w < nwords; w++) {
        uint64_t bits = bitmap[w];
        while (bits) {
            out[n++] = (uint32_t)(w * 64 + __builtin_ctzll(bits));
            bits &= bits - 1;
        }
    }
    return n;
}

void kvmcolo_bitmap_or(uint64_t *dst, const uint64_t *src, size_t nwords)
{
    for (size_t w = 0; w < nwords; w++)
        dst[w] |= src[w];
}

/* Copy the listed 4 KiB pages of `base` into consecutive pages of `dst`. */
void kvmcolo_gather_pages(const uint8_t *base, const uint32_t *pages, size_t n, uint8_t *dst)
{
    for (size_t i = 0; i < n; i++)
        memcpy(dst + (i << 12), base + ((size_t)pages[i] << 12), 4096);
}

/* Pages of `base` that hold anything but zeros (a full snapshot stores only
   those: a fresh VM's RAM is zero).  Stops scanning a page at its first
   non-zero word, so untouched guest memory is read once at memory speed. */
size_t kvmcolo_nonzero_pages(const uint8_t *base, size_t npages, uint32_t *out)
{
    size_t n = 0;
    for (size_t p = 0; p < npages; p++) {
        const uint64_t *w = (const uint64_t *)(base + (p << 12));
        for (size_t i = 0; i < 512; i++)
            if (w[i]) {
                out[n++] = (uint32_t)p;
                break;
            }
    }
    return n;
}

/* The listed pages from one mapping to the same pages of another (the
   COLO secondary: RAM cache -> SVM RAM). */
void kvmcolo_copy_pages(uint8_t *dst, const uint8_t *src, const uint32_t *pages, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        size_t at = (size_t)pages[i] << 12;
        memcpy(dst + at, src + at, 4096);
    }
}

void kvmcolo_bitmap_set_pages(uint64_t *bitmap, const uint32_t *pages, size_t n)
{
    for (size_t i = 0; i < n; i++)
        bitmap[pages[i] >> 6] |= 1ull << (pages[i] & 63);
}

/* The inverse: consecutive pages of `src` to the listed pages of `base`. */
void kvmcolo_scatter_pages(uint8_t *base, const uint32_t *pages, size_t n, const uint8_t *src)
{
    for (size_t i = 0; i < n; i++)
        memcpy(base + ((size_t)pages[i] << 12), src + (i << 12), 4096);
}
""",
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
