/*
 * C runtime of the kvmcolo test guests.
 *
 * Everything here runs at CPL3 except cpl0_exception().  CPL3 can read the
 * PVH start info, the ACPI tables and the memory map directly because the
 * identity map has the U bit everywhere; only privileged operations (LAPIC
 * writes, hlt) go through the int3 "system call" (see boot.S).
 */
#include "guest.h"

/* ---- provided by boot.S / guest.ld ---- */
extern u32 pvh_start_info, boot_tsc_khz, boot_bus_khz, bsp_apic_id;
extern volatile u32 ap_boot_cpu;
extern char kstacks[], ustacks[], _end[], __bss_start[], __bss_end[];
void console_force_lock(void);
void console_write(const char *s, size_t n);

/* Per-CPU CPL0 block at the base of each kernel stack (see timer_isr). */
struct kcpu {
        volatile u64 ticks;
};
#define KCPU(cpu) ((struct kcpu *)(kstacks + (u64)(cpu) * KSTACK_SIZE))

/* ---- PVH start info (Xen public ABI, arch-x86/hvm/start_info.h) ---- */
#define HVM_START_MAGIC 0x336ec578
struct hvm_start_info {
        u32 magic, version, flags, nr_modules;
        u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
        u32 memmap_entries, reserved;
};
struct hvm_memmap_entry {
        u64 addr, size;
        u32 type, reserved;
};
#define E820_RAM 1

/* ---- state gathered at start-up ---- */
static char cmdline_buf[1024];
static int cpu_count = 1;
static u32 cpu_apic[MAX_CPUS];
static volatile u32 cpu_online[MAX_CPUS];
static void (*volatile ap_fn)(int cpu);
static u64 tsc_khz_val, bus_khz_val, mem_bytes, free_start, free_end, free_next;
#define MAX_IOAPICS 4
static int ioapic_n;
static u64 ioapic_addr[MAX_IOAPICS];
static u32 ioapic_gsi[MAX_IOAPICS];

/* ---- exit ---- */

void guest_exit(int status)
{
        /* The VMM exits with status & 0xff; QEMU isa-debug-exit with (v<<1)|1. */
        outb(PORT_DEBUG_EXIT, (u8)status);
        for (;;)
                wait_irq();
}

void panic(const char *fmt, ...)
{
        char buf[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        printf("guest: panic: %s\n", buf);
        guest_exit(EXIT_PANIC);
}

/*
 * CPL0: any exception or unexpected vector.  frame = vector, error code,
 * rip, cs, rflags, rsp, ss.  Slow under PVM (emulated), but it only runs once.
 */
void __attribute__((noreturn)) cpl0_exception(const u64 *f, u64 cr2)
{
        u64 off = (u64)f - (u64)kstacks;
        long cpu = off < (u64)MAX_CPUS * KSTACK_SIZE ? (long)(off >> KSTACK_SHIFT) : -1;
        char buf[200];
        int n = snprintf(buf, sizeof(buf),
                         "guest: exception %llu err=0x%llx rip=0x%llx cs=0x%llx "
                         "rsp=0x%llx cr2=0x%llx cpu=%ld\n",
                         f[0], f[1], f[2], f[3], f[5], cr2, cpu);
        console_force_lock();
        console_write(buf, (size_t)n);
        outb(PORT_DEBUG_EXIT, EXIT_PANIC);
        for (;;)
                __asm__ volatile("cli; hlt");
}

/* ---- command line ---- */

const char *cmdline(void) { return cmdline_buf; }

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

const char *cmdline_word(const char **pp)
{
        const char *p = *pp;
        while (is_space(*p))
                p++;
        const char *w = p;
        while (*p && !is_space(*p))
                p++;
        *pp = p;
        return p == w ? 0 : w;
}

/*
 * Finds the last word "key=value" (or bare "key") and copies the value to
 * out.  Returns 0 if the key is absent.
 */
static int find_arg(const char *key, char *out, size_t outsz)
{
        size_t klen = strlen(key);
        int found = 0;
        const char *p = cmdline_buf, *w;
        while ((w = cmdline_word(&p))) {
                if ((size_t)(p - w) >= klen && !strncmp(w, key, klen) &&
                    (w + klen == p || w[klen] == '=')) {
                        const char *v = w + klen + (w + klen < p);
                        size_t n = (size_t)(p - v);
                        if (n >= outsz)
                                n = outsz - 1;
                        memcpy(out, v, n);
                        out[n] = 0;
                        found = 1;
                }
        }
        return found;
}

/* Every word's key must be declared by the workload (dotted keys are ignored). */
static void check_params(void)
{
        const char *p = cmdline_buf, *w;
        while ((w = cmdline_word(&p))) {
                size_t klen = 0;
                while (w + klen < p && w[klen] != '=')
                        klen++;
                if (!klen)              /* "=value": report the whole word */
                        klen = (size_t)(p - w);
                int known = 0, dotted = 0;
                for (size_t i = 0; i < klen; i++)
                        dotted |= w[i] == '.';
                for (const char *const *k = guest_params; *k; k++)
                        if (strlen(*k) == klen && !strncmp(*k, w, klen))
                                known = 1;
                /*
                 * "module.param=..." words are meant for someone else (e.g. a
                 * VMM may append virtio_mmio.device=...): ignore them.
                 */
                if (!known && !dotted) {
                        char key[64];
                        size_t n = klen < sizeof(key) - 1 ? klen : sizeof(key) - 1;
                        memcpy(key, w, n);
                        key[n] = 0;
                        printf("guest: unknown parameter '%s'\n", key);
                        guest_exit(EXIT_BADARGS);
                }
        }
}

static void bad_value(const char *key, const char *val)
{
        printf("guest: bad value for parameter '%s': '%s'\n", key, val);
        guest_exit(EXIT_BADARGS);
}

const char *arg_str(const char *key, const char *dflt)
{
        /* One static slot per call site would be nicer; workloads call this rarely. */
        static char vals[4][256];
        static int next;
        char *v = vals[next++ & 3];
        return find_arg(key, v, sizeof(vals[0])) ? v : dflt;
}

/* Number at *pp: 0x hex or decimal; optional K/M/G suffix if `suffix`. */
int parse_u64(const char **pp, const char *end, u64 *out, int suffix)
{
        const char *p = *pp;
        unsigned base = 10;
        if (end - p > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
                base = 16;
                p += 2;
        }
        u64 x = 0;
        int digits = 0;
        for (; p < end; p++) {
                unsigned d;
                if (*p >= '0' && *p <= '9')
                        d = (unsigned)(*p - '0');
                else if (base == 16 && *p >= 'a' && *p <= 'f')
                        d = (unsigned)(*p - 'a' + 10);
                else if (base == 16 && *p >= 'A' && *p <= 'F')
                        d = (unsigned)(*p - 'A' + 10);
                else
                        break;
                if (x > (~0ull - d) / base)
                        return -1;
                x = x * base + d;
                digits++;
        }
        if (!digits)
                return -1;
        if (suffix && p < end) {
                unsigned shift = 0;
                switch (*p) {
                case 'k': case 'K': shift = 10; break;
                case 'm': case 'M': shift = 20; break;
                case 'g': case 'G': shift = 30; break;
                }
                if (shift) {
                        if (x > (~0ull >> shift))
                                return -1;
                        x <<= shift;
                        p++;
                }
        }
        *pp = p;
        *out = x;
        return 0;
}

u64 arg_u64(const char *key, u64 dflt)
{
        char v[64];
        if (!find_arg(key, v, sizeof(v)))
                return dflt;
        const char *p = v;
        u64 x;
        if (parse_u64(&p, v + strlen(v), &x, 1) || *p)
                bad_value(key, v);
        return x;
}

/* ---- machine info ---- */

int ncpus(void) { return cpu_count; }
u64 tsc_khz(void) { return tsc_khz_val; }
u64 bus_khz(void) { return bus_khz_val; }
u64 mem_mib(void) { return (mem_bytes + (1 << 20) - 1) >> 20; }
u64 free_ram_start(void) { return free_start; }
u64 free_ram_end(void) { return free_end; }

void *ram_alloc(u64 bytes)
{
        if (!free_next)
                free_next = free_start;
        bytes = (bytes + 4095) & ~4095ull;
        if (!free_next || bytes > free_end - free_next)
                panic("out of free RAM (%llu bytes wanted)", bytes);
        void *p = (void *)free_next;
        free_next += bytes;
        memset(p, 0, bytes);
        return p;
}

int ioapic_count(void) { return ioapic_n; }
u64 ioapic_base(int i) { return ioapic_addr[i]; }
u32 ioapic_gsi_base(int i) { return ioapic_gsi[i]; }

static int rdrand64(u64 *v)
{
        unsigned char ok;
        __asm__ volatile("rdrand %0; setc %1" : "=r"(*v), "=qm"(ok));
        return ok;
}

u64 random_u64(void)
{
        static int have = -1;
        if (have < 0) {
                /* CPUID at CPL3 shows the host's features, which is what runs here. */
                u32 a = 1, b, c, d;
                __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d));
                have = (c >> 30) & 1;
        }
        u64 v;
        for (int i = 0; have && i < 10; i++)
                if (rdrand64(&v))
                        return v;
        /* Fallback: the TSC's low bits differ between two runs of one guest. */
        static u64 state;
        state += rdtsc() * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
        v = state;
        v = (v ^ (v >> 30)) * 0xbf58476d1ce4e5b9ull;
        v = (v ^ (v >> 27)) * 0x94d049bb133111ebull;
        return v ^ (v >> 31);
}

int this_cpu(void)
{
        u64 sp;
        __asm__("mov %%rsp, %0" : "=r"(sp));
        return (int)((sp - (u64)ustacks) >> USTACK_SHIFT);
}

u64 cpu_ticks(int cpu) { return KCPU(cpu)->ticks; }

void delay_us(u64 us)
{
        u64 end = rdtsc() + us * tsc_khz_val / 1000;
        while ((i64)(rdtsc() - end) < 0)
                cpu_relax();
}

void lapic_timer_periodic(u32 hz)
{
        if (!hz) {
                apic_write(LAPIC_LVT_TIMER, APIC_LVT_MASKED | TIMER_VECTOR);
                apic_write(LAPIC_TIMER_INIT, 0);
                return;
        }
        u64 count = bus_khz_val * 1000 / hz;
        if (!count)
                count = 1;
        if (count > 0xffffffffull)
                count = 0xffffffffull;
        apic_write(LAPIC_TIMER_DIV, 0xb);                       /* divide by 1 */
        apic_write(LAPIC_LVT_TIMER, (1 << 17) | TIMER_VECTOR);  /* periodic */
        apic_write(LAPIC_TIMER_INIT, (u32)count);
}

/* ---- memory map ---- */

static void parse_memmap(const struct hvm_start_info *si)
{
        u64 image_end = ((u64)_end + 4095) & ~4095ull;
        if (si->version < 1 || !si->memmap_paddr || !si->memmap_entries) {
                puts("guest: no memory map in start info, no free RAM");
                return;
        }
        const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
        for (u32 i = 0; i < si->memmap_entries; i++) {
                if (e[i].type != E820_RAM)
                        continue;
                mem_bytes += e[i].size;
                u64 end = e[i].addr + e[i].size;
                if (end > 0x100000000ull)
                        end = 0x100000000ull;   /* only the first 4 GiB is mapped */
                if (e[i].addr < (u64)_end && (u64)_end <= end && image_end < end) {
                        free_start = image_end;
                        free_end = end & ~4095ull;
                }
        }
}

/* ---- ACPI: RSDP -> XSDT/RSDT -> MADT ---- */

struct rsdp {
        char sig[8];
        u8 csum;
        char oem[6];
        u8 rev;
        u32 rsdt;
        u32 len;
        u64 xsdt;
        u8 xcsum, res[3];
} __attribute__((packed));

struct sdt {
        char sig[4];
        u32 len;
        u8 rev, csum;
        char oem[6], oemtab[8];
        u32 oemrev, creator, crev;
} __attribute__((packed));

static int csum_ok(const void *p, u32 n)
{
        u8 s = 0;
        for (u32 i = 0; i < n; i++)
                s += ((const u8 *)p)[i];
        return s == 0;
}

static const struct rsdp *find_rsdp(u64 hint)
{
        if (hint && hint < 0x100000000ull)
                return (const void *)hint;
        for (u64 a = 0xe0000; a < 0x100000; a += 16) {
                const struct rsdp *r = (const void *)a;
                if (!memcmp(r->sig, "RSD PTR ", 8) && csum_ok(r, 20))
                        return r;
        }
        return 0;
}

static const struct sdt *find_table(const struct rsdp *r, const char *sig)
{
        int x = r->rev >= 2 && r->xsdt && r->xsdt < 0x100000000ull;
        const struct sdt *root = (const void *)(x ? r->xsdt : (u64)r->rsdt);
        if (!root)
                return 0;
        u32 esz = x ? 8 : 4;
        u32 n = (root->len - (u32)sizeof(*root)) / esz;
        const u8 *ents = (const u8 *)(root + 1);
        for (u32 i = 0; i < n; i++) {
                u64 a = 0;
                memcpy(&a, ents + i * esz, esz);
                if (!a || a >= 0x100000000ull)
                        continue;
                const struct sdt *t = (const void *)a;
                if (!memcmp(t->sig, sig, 4))
                        return t;
        }
        return 0;
}

static void parse_madt(const struct hvm_start_info *si)
{
        cpu_apic[0] = bsp_apic_id;
        const struct rsdp *r = find_rsdp(si->rsdp_paddr);
        const struct sdt *madt = r ? find_table(r, "APIC") : 0;
        if (!madt) {
                puts("guest: no ACPI MADT found, assuming 1 cpu");
                ioapic_addr[0] = 0xfec00000;    /* the PC's standard IOAPIC */
                ioapic_n = 1;
                return;
        }
        const u8 *p = (const u8 *)madt + sizeof(struct sdt) + 8;
        const u8 *end = (const u8 *)madt + madt->len;
        int dropped = 0;
        for (; p + 2 <= end && p[1] >= 2; p += p[1]) {
                u32 id, flags;
                if (p[0] == 1 && p[1] >= 12) {          /* I/O APIC */
                        if (ioapic_n < MAX_IOAPICS) {
                                u32 a;
                                memcpy(&a, p + 4, 4);
                                ioapic_addr[ioapic_n] = a;
                                memcpy(&ioapic_gsi[ioapic_n], p + 8, 4);
                                ioapic_n++;
                        }
                        continue;
                }
                if (p[0] == 0 && p[1] >= 8) {           /* Processor Local APIC */
                        id = p[3];
                        memcpy(&flags, p + 4, 4);
                } else if (p[0] == 9 && p[1] >= 16) {   /* Processor Local x2APIC */
                        memcpy(&id, p + 4, 4);
                        memcpy(&flags, p + 8, 4);
                        if (id > 0xfe)
                                continue;               /* xAPIC only */
                } else {
                        continue;
                }
                if (!(flags & 1) || id == bsp_apic_id)
                        continue;
                if (cpu_count == MAX_CPUS) {
                        dropped++;
                        continue;
                }
                cpu_apic[cpu_count++] = id;
        }
        if (dropped)
                printf("guest: %d cpus beyond MAX_CPUS=%d ignored\n", dropped, MAX_CPUS);
        if (!ioapic_n) {
                ioapic_addr[0] = 0xfec00000;
                ioapic_n = 1;
        }
}

/* ---- SMP ---- */

static int wait_online(int cpu, u64 us)
{
        u64 end = rdtsc() + us * tsc_khz_val / 1000;
        while (!cpu_online[cpu])
                if ((i64)(rdtsc() - end) >= 0)
                        return cpu_online[cpu];
        return 1;
}

void smp_start(void (*fn)(int cpu))
{
        ap_fn = fn;
        for (int cpu = 1; cpu < cpu_count; cpu++) {
                if (cpu_online[cpu])
                        continue;
                KCPU(cpu)->ticks = 0;
                /* The AP's CPL0 boot code reads its index from here. */
                __atomic_store_n(&ap_boot_cpu, (u32)cpu, __ATOMIC_SEQ_CST);
                apic_write(LAPIC_ICR_HI, cpu_apic[cpu] << 24);
                apic_write(LAPIC_ICR_LO, 0x4500);                       /* INIT, assert */
                delay_us(10);
                apic_write(LAPIC_ICR_HI, cpu_apic[cpu] << 24);
                apic_write(LAPIC_ICR_LO, 0x4600 | AP_SIPI_VECTOR);      /* SIPI */
                /*
                 * Under PVM, SIPI -> long mode takes 0.2-0.4 ms: only send the
                 * second SIPI (ignored by a running CPU) after 1 ms.
                 */
                if (!wait_online(cpu, 1000)) {
                        apic_write(LAPIC_ICR_HI, cpu_apic[cpu] << 24);
                        apic_write(LAPIC_ICR_LO, 0x4600 | AP_SIPI_VECTOR);
                        if (!wait_online(cpu, 100000)) {
                                printf("guest: cpu %d did not start\n", cpu);
                                guest_exit(EXIT_PANIC);
                        }
                }
        }
}

/* First CPL3 code on an AP (entered by iretq from boot.S, %rdi = cpu). */
void __attribute__((noreturn)) ap_user_start(int cpu)
{
        __atomic_store_n(&cpu_online[cpu], 1, __ATOMIC_RELEASE);
        ap_fn(cpu);
        for (;;)
                wait_irq();
}

/* ---- BSP start-up, first CPL3 code (entered by iretq from boot.S) ---- */

void __attribute__((noreturn)) user_start(void)
{
        /* Don't rely on the loader having zeroed .bss (stacks are elsewhere). */
        memset(__bss_start, 0, (size_t)(__bss_end - __bss_start));
        /*
         * Tick counters live on the (NOBITS, uncleared) kernel stacks.  Clear
         * only the ones of CPUs that run: under PVM each first touch of a
         * page costs several us (smp_start clears the APs' ones).
         */
        KCPU(0)->ticks = 0;
        cpu_online[0] = 1;

        tsc_khz_val = boot_tsc_khz;
        bus_khz_val = boot_bus_khz;
        if (!tsc_khz_val) {
                tsc_khz_val = 1000000;
                puts("guest: no TSC frequency in CPUID 0x40000010, assuming 1 GHz");
        }
        if (!bus_khz_val)
                bus_khz_val = 1000000;  /* KVM's and QEMU's LAPIC timer run at 1 GHz */

        const struct hvm_start_info *si = (const void *)(u64)pvh_start_info;
        if (!si || si->magic != HVM_START_MAGIC) {
                printf("guest: bad PVH start info at 0x%x\n", pvh_start_info);
                guest_exit(EXIT_PANIC);
        }
        if (si->cmdline_paddr) {
                const char *c = (const char *)si->cmdline_paddr;
                size_t n = strlen(c);
                if (n >= sizeof(cmdline_buf))
                        n = sizeof(cmdline_buf) - 1;
                memcpy(cmdline_buf, c, n);
        }
        parse_memmap(si);
        parse_madt(si);
        check_params();
        guest_exit(main());
}
