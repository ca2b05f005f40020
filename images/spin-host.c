/*
 * spin-host: the `spin` kernel as a normal Linux program.
 * Usage: spin-host [iters]   (default 100000000)
 */
#include <stdio.h>
#include <stdlib.h>
#include "spin_kernel.h"

static unsigned long long rdtsc(void)
{
        unsigned lo, hi;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        return ((unsigned long long)hi << 32) | lo;
}

int main(int argc, char **argv)
{
        unsigned long long iters = 100000000ull;
        if (argc > 1) {
                char *end;
                iters = strtoull(argv[1], &end, 0);
                if (*end || argc > 2) {
                        fprintf(stderr, "usage: %s [iters]\n", argv[0]);
                        return 2;
                }
        }
        unsigned long long t0 = rdtsc();
        unsigned long long r = spin_kernel(iters);
        unsigned long long t1 = rdtsc();
        printf("spin: iters=%llu cycles=%llu result=0x%llx\n", iters, t1 - t0, r);
        return 0;
}
