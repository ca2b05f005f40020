/*
 * smp: all CPUs make progress at CPL3.
 *   interval=MS  BSP report period in ms (default 20)
 *   rounds=N     rounds in which every counter must strictly increase (5)
 * Prints "smp: round=R cpu0=A cpu1=B ..." per round, then "smp: ok cpus=N";
 * "smp: FAIL cpu N stalled" (exit 1) if a CPU makes no progress for 1 s.
 */
#include "guest.h"

GUEST_PARAMS("interval", "rounds");

/* One cache line per counter: no false sharing between the writers. */
static struct {
        volatile u64 v;
        u8 pad[56];
} counters[MAX_CPUS] __attribute__((aligned(64)));

static void __attribute__((noreturn)) spin_counter(int cpu)
{
        volatile u64 *c = &counters[cpu].v;
        for (;;)
                (*c)++;
}

int main(void)
{
        u64 interval = arg_u64("interval", 20);
        u64 rounds = arg_u64("rounds", 5);
        int n = ncpus();
        if (n < 2) {
                printf("smp: need at least 2 cpus, have %d\n", n);
                return EXIT_BADARGS;
        }
        if (!interval) {
                puts("smp: interval must be > 0");
                return EXIT_BADARGS;
        }
        smp_start(spin_counter);

        u64 prev[MAX_CPUS], progress[MAX_CPUS];
        u64 now = rdtsc(), step = interval * tsc_khz(), second = tsc_khz() * 1000;
        for (int i = 0; i < n; i++) {
                prev[i] = counters[i].v;
                progress[i] = now;
        }
        u64 next = now + step, good = 0;
        volatile u64 *mine = &counters[0].v;
        for (u64 round = 1;;) {
                for (int k = 0; k < 4096; k++)
                        (*mine)++;
                now = rdtsc();
                if ((i64)(now - next) < 0)
                        continue;
                next = now + step;

                char line[64 + 32 * MAX_CPUS];
                int len = snprintf(line, sizeof(line), "smp: round=%llu", round++);
                int all = 1;
                for (int i = 0; i < n; i++) {
                        u64 c = counters[i].v;
                        len += snprintf(line + len, sizeof(line) - len, " cpu%d=%llu", i, c);
                        if (c > prev[i]) {
                                progress[i] = now;
                        } else {
                                all = 0;
                                if (now - progress[i] > second) {
                                        puts(line);
                                        printf("smp: FAIL cpu %d stalled\n", i);
                                        return EXIT_FAIL;
                                }
                        }
                        prev[i] = c;
                }
                puts(line);
                if (all && ++good >= rounds) {
                        printf("smp: ok cpus=%d\n", n);
                        return EXIT_OK;
                }
        }
}
