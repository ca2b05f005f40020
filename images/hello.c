/*
 * hello: boot smoke test.
 *   status=N  exit status (default 0, 0..255)
 *   ticks=N   optional: run the LAPIC timer at 1000 Hz and sleep (SYS_WAIT_IRQ)
 *             until N ticks arrived, then report (default 0 = skip)
 *   reset=1   end by asking the i8042 to pulse the reset line (port 0x64,
 *             command 0xFE) instead of writing the debug-exit port
 */
#include "guest.h"

GUEST_PARAMS("status", "ticks", "reset");

int main(void)
{
        u64 status = arg_u64("status", 0);
        u64 ticks = arg_u64("ticks", 0);
        if (status > 255) {
                printf("hello: status=%llu out of range 0..255\n", status);
                return EXIT_BADARGS;
        }
        puts("hello from kvmcolo guest");
        printf("hello: cpus=%d tsc_khz=%llu mem=%llu MiB cmdline='%s'\n",
               ncpus(), tsc_khz(), mem_mib(), cmdline());
        if (ticks) {
                u64 t0 = rdtsc(), n0 = cpu_ticks(0);
                lapic_timer_periodic(1000);
                while (cpu_ticks(0) - n0 < ticks)
                        wait_irq();
                lapic_timer_periodic(0);
                u64 us = (rdtsc() - t0) * 1000 / tsc_khz();
                printf("hello: ticks=%llu hz=1000 elapsed_us=%llu\n", ticks, us);
        }
        if (arg_u64("reset", 0)) {
                puts("hello: resetting through the i8042");
                outb(0x64, 0xfe);
        }
        return (int)status;
}
