/*
 * pio: port-I/O exit benchmark.
 *   count=N   single-byte outb to port 0x80 from CPL3 (default 100000)
 * Prints "pio: count=N cycles=C".  CPL3 may do port I/O only because the TSS
 * I/O bitmap allows it (PVM forces IOPL to 0).
 */
#include "guest.h"

GUEST_PARAMS("count");

int main(void)
{
        u64 count = arg_u64("count", 100000);
        u64 t0 = rdtsc();
        for (u64 i = 0; i < count; i++)
                outb(PORT_POST, (u8)i);
        u64 t1 = rdtsc();
        printf("pio: count=%llu cycles=%llu\n", count, t1 - t0);
        return EXIT_OK;
}
