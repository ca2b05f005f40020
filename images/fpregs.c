/*
 * fpregs: keeps known values in the x87, SSE and MXCSR registers and checks
 * them over and over at CPL3 (the VMM's test that vCPU floating-point state
 * is restored exactly: across checkpoints, snapshot/restore and failover).
 *   passes=N  0 = forever (0)
 *   rate=N    checks per second, 0 = unthrottled; paced on rdtsc (1000)
 *   report=N  print "fpregs: pass=P ok" every N passes, 0 = never (100)
 *   seed=N    value seed (1)
 *
 * At start-up XMM0-15 get seed-derived values (all non-zero, so no
 * processor may treat SSE as being in its init state), MXCSR a non-default
 * rounding mode, and the x87 stack eight values.  Each pass then FXSAVEs
 * the registers and compares the x87 and SSE parts with the first save.
 * Nothing else in the guest touches these registers: the runtime is built
 * with -mgeneral-regs-only and its CPL0 handlers save no FPU state.
 */
#include "guest.h"

GUEST_PARAMS("passes", "rate", "report", "seed");

/* FXSAVE image fields compared (see the SDM's FXSAVE layout): FCW..FDP
 * (bytes 0-23), MXCSR (24-27), ST0-7 (32-159), XMM0-15 (160-415).  The
 * MXCSR mask (28-31) is a processor property, not state. */
#define FX_MXCSR_MASK 28
#define FX_END 416

static u8 reference[512] __attribute__((aligned(16)));
static u8 current[512] __attribute__((aligned(16)));
static u64 values[32] __attribute__((aligned(16)));

static void load_registers(u64 seed)
{
        for (int i = 0; i < 32; i++)
                values[i] = (seed + (u64)i + 1) * 0x9e3779b97f4a7c15ull | 1;
        const u64 *v = values;
        __asm__ volatile(
                "movdqa 0x00(%0), %%xmm0\n\t"  "movdqa 0x10(%0), %%xmm1\n\t"
                "movdqa 0x20(%0), %%xmm2\n\t"  "movdqa 0x30(%0), %%xmm3\n\t"
                "movdqa 0x40(%0), %%xmm4\n\t"  "movdqa 0x50(%0), %%xmm5\n\t"
                "movdqa 0x60(%0), %%xmm6\n\t"  "movdqa 0x70(%0), %%xmm7\n\t"
                "movdqa 0x80(%0), %%xmm8\n\t"  "movdqa 0x90(%0), %%xmm9\n\t"
                "movdqa 0xa0(%0), %%xmm10\n\t" "movdqa 0xb0(%0), %%xmm11\n\t"
                "movdqa 0xc0(%0), %%xmm12\n\t" "movdqa 0xd0(%0), %%xmm13\n\t"
                "movdqa 0xe0(%0), %%xmm14\n\t" "movdqa 0xf0(%0), %%xmm15\n\t"
                :: "r"(v) : "memory");
        u32 mxcsr = 0x7f80; /* all exceptions masked, round toward zero, DAZ off */
        __asm__ volatile("ldmxcsr %0" :: "m"(mxcsr));
        /* x87: a full stack of distinct values, then a rounding/precision
         * control word that differs from the init one (0x037f). */
        u16 fcw = 0x0e7f;
        __asm__ volatile(
                "fninit\n\t"
                "fldcw %0\n\t"
                "fld1\n\t" "fldl2t\n\t" "fldl2e\n\t" "fldpi\n\t"
                "fldlg2\n\t" "fldln2\n\t" "fldz\n\t" "fld1\n\t"
                :: "m"(fcw));
}

static void save(u8 *area)
{
        __asm__ volatile("fxsave64 %0" : "=m"(*(u8 (*)[512])area));
}

static int differs_at(void)
{
        for (int i = 0; i < FX_END; i++) {
                if (i >= FX_MXCSR_MASK && i < FX_MXCSR_MASK + 4)
                        continue;
                if (current[i] != reference[i])
                        return i;
        }
        return -1;
}

int main(void)
{
        u64 passes = arg_u64("passes", 0);
        u64 rate = arg_u64("rate", 1000);
        u64 report = arg_u64("report", 100);
        u64 seed = arg_u64("seed", 1);

        load_registers(seed);
        save(reference);
        printf("fpregs: start passes=%llu rate=%llu seed=%llu\n", passes, rate, seed);

        u64 period = rate ? tsc_khz() * 1000 / rate : 0;
        u64 t0 = rdtsc();
        for (u64 pass = 1; !passes || pass <= passes; pass++) {
                save(current);
                int at = differs_at();
                if (at >= 0) {
                        printf("fpregs: FAIL pass=%llu byte=%d expected=0x%x got=0x%x\n",
                               pass, at, reference[at], current[at]);
                        guest_exit(EXIT_FAIL);
                }
                if (report && pass % report == 0)
                        printf("fpregs: pass=%llu ok\n", pass);
                if (period) {
                        u64 due = t0 + pass * period;
                        while ((i64)(rdtsc() - due) < 0)
                                cpu_relax();
                }
        }
        printf("fpregs: done passes=%llu\n", passes);
        return EXIT_OK;
}
