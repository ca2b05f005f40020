/* /init for kvmcolo's test kernel: runs at CPL3 and never makes a system
 * call, so it works on hosts where userspace cannot enter the kernel
 * (nested PVM); the kernel stays up and serves the network.  A real system
 * runs its own init instead. */
void _start(void)
{
    for (;;)
        __asm__ volatile("pause");
}
