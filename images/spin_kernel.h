/*
 * The fixed integer kernel of the `spin` benchmark, shared by the guest
 * (spin.elf, CPL3) and the native build (spin-host) so the VMM can compute a
 * guest/native speed ratio.  xorshift64: one long dependency chain of
 * shifts and xors, nothing the compiler can vectorise or fold.
 */
#ifndef KVMCOLO_SPIN_KERNEL_H
#define KVMCOLO_SPIN_KERNEL_H

static __attribute__((noinline)) unsigned long long spin_kernel(unsigned long long iters)
{
        unsigned long long x = 0x9e3779b97f4a7c15ull;
        for (unsigned long long i = 0; i < iters; i++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
        }
        return x;
}

#endif
