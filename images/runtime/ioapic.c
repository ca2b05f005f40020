/*
 * IOAPIC routing from CPL3.  The IOAPIC's MMIO window is identity-mapped
 * with the U bit, so no system call is needed.  Only the BSP's event loop
 * routes interrupts, so the IOREGSEL/IOWIN pair needs no lock.
 */
#include "guest.h"

#define IOREGSEL        0x00
#define IOWIN           0x10
#define IOAPIC_VER      0x01
#define IOREDTBL(pin)   (0x10 + 2 * (pin))

extern u32 bsp_apic_id;

static u32 ioapic_read(u64 base, u32 reg)
{
        *(volatile u32 *)(base + IOREGSEL) = reg;
        return *(volatile u32 *)(base + IOWIN);
}

static void ioapic_write(u64 base, u32 reg, u32 val)
{
        *(volatile u32 *)(base + IOREGSEL) = reg;
        *(volatile u32 *)(base + IOWIN) = val;
}

int ioapic_route(u32 gsi)
{
        if (gsi >= DEV_VECTORS)
                return -1;
        for (int i = 0; i < ioapic_count(); i++) {
                u64 base = ioapic_base(i);
                u32 first = ioapic_gsi_base(i);
                if (gsi < first)
                        continue;
                u32 pins = ((ioapic_read(base, IOAPIC_VER) >> 16) & 0xff) + 1;
                if (gsi - first >= pins)
                        continue;
                u32 pin = gsi - first;
                u32 vector = DEV_VECTOR_BASE + gsi;
                /*
                 * Destination first, then the low word, which unmasks.
                 * Low word: vector, fixed delivery (000), physical mode,
                 * active high, edge-triggered, not masked = just the vector.
                 * Edge because the device's line stays high until the driver
                 * writes InterruptACK: a level entry would re-fire
                 * continuously while CPL3 has not acknowledged yet.
                 */
                ioapic_write(base, IOREDTBL(pin) + 1, bsp_apic_id << 24);
                ioapic_write(base, IOREDTBL(pin), vector);
                return (int)vector;
        }
        return -1;
}
