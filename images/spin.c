/*
 * spin: CPL3 compute benchmark.
 *   iters=N   xorshift64 iterations (default 100000000)
 * Prints "spin: iters=N cycles=C result=0x..." (same as spin-host).
 */
#include "guest.h"
#include "spin_kernel.h"

GUEST_PARAMS("iters");

int main(void)
{
        u64 iters = arg_u64("iters", 100000000);
        u64 t0 = rdtsc();
        u64 r = spin_kernel(iters);
        u64 t1 = rdtsc();
        printf("spin: iters=%llu cycles=%llu result=0x%llx\n", iters, t1 - t0, r);
        return EXIT_OK;
}
