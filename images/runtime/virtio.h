/*
 * virtio 1.x over virtio-mmio (Version 2): device table, device set-up and a
 * generic split-virtqueue driver.  Everything runs at CPL3: the MMIO windows
 * are identity-mapped with the U bit.
 *
 * Cost model (PVM): every MMIO register access is a VM exit (~60 us), while
 * rings are plain RAM.  So the hot path never reads a register: completions
 * are found by polling the used rings, QueueNotify writes go to an ioeventfd
 * (cheap), and InterruptStatus is read and acknowledged only when the
 * device's interrupt count moved, right before sleeping (virtio_idle).
 */
#ifndef KVMCOLO_VIRTIO_H
#define KVMCOLO_VIRTIO_H

#include "guest.h"

#define VIRTIO_ID_NET   1
#define VIRTIO_ID_BLK   2

/* virtio-mmio registers (virtio 1.x spec, 4.2.2). */
#define VIRTIO_MMIO_MAGIC               0x000   /* "virt" */
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC_VALUE         0x74726976

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE       0x01
#define VIRTIO_STATUS_DRIVER            0x02
#define VIRTIO_STATUS_DRIVER_OK         0x04
#define VIRTIO_STATUS_FEATURES_OK       0x08
#define VIRTIO_STATUS_NEEDS_RESET       0x40
#define VIRTIO_STATUS_FAILED            0x80

/* InterruptStatus bits. */
#define VIRTIO_INT_USED_RING            0x1
#define VIRTIO_INT_CONFIG               0x2

#define VIRTIO_F_VERSION_1              (1ull << 32)

/* ---- device table: the virtio_mmio.device= words of the command line ---- */
struct virtio_mmio_info {
        u64 base, size;
        u32 irq;                /* GSI */
        u32 device_id;          /* read from the window; 0 = empty slot */
};
/*
 * Parsed on first use (so workloads without virtio never touch the MMIO
 * windows), sorted by base address.  A malformed word prints
 * "guest: bad virtio_mmio.device word '...'" and exits 2.
 */
int virtio_device_count(void);
const struct virtio_mmio_info *virtio_device(int i);
/* The nth (0-based, in base order) device with this DeviceID, or NULL. */
const struct virtio_mmio_info *virtio_find(u32 device_id, int nth);

/* ---- a device being driven ---- */
struct virtio_dev {
        u64 base;
        u32 irq, device_id;
        int vector;             /* -1: no IOAPIC pin, rely on polling + timer */
        u64 features;           /* negotiated */
        u64 irq_seen;           /* dev_irq_count[irq] when last acknowledged */
        u32 isr_seen;           /* OR of InterruptStatus values acknowledged */
};

static inline u32 virtio_read32(const struct virtio_dev *d, u32 off)
{
        return *(volatile u32 *)(d->base + off);
}
static inline void virtio_write32(const struct virtio_dev *d, u32 off, u32 v)
{
        *(volatile u32 *)(d->base + off) = v;
}
static inline u8 virtio_config8(const struct virtio_dev *d, u32 off)
{
        return *(volatile u8 *)(d->base + VIRTIO_MMIO_CONFIG + off);
}
/* A 64-bit config field, read consistently (ConfigGeneration loop). */
u64 virtio_config64(const struct virtio_dev *d, u32 off);
static inline u32 virtio_status(const struct virtio_dev *d)
{
        return virtio_read32(d, VIRTIO_MMIO_STATUS);
}

/*
 * Reset, ACKNOWLEDGE, DRIVER, feature negotiation (offered & wanted, which
 * must include VIRTIO_F_VERSION_1), FEATURES_OK and its check, IOAPIC
 * routing of the device's GSI.  Also starts a 100 Hz LAPIC timer on this
 * CPU (once) so every sleep has a bounded length.  Returns 0, or -1 after
 * printing "<who>: <reason>".  Queues come next, then virtio_driver_ok().
 */
int virtio_open(struct virtio_dev *d, const struct virtio_mmio_info *info,
                u64 wanted, const char *who);
void virtio_driver_ok(struct virtio_dev *d);
/* Status := 0, wait (bounded) until the device reads back 0. */
void virtio_reset(struct virtio_dev *d);

/* ---- split virtqueue ---- */
#define VIRTQ_DESC_F_NEXT       1
#define VIRTQ_DESC_F_WRITE      2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

struct virtq_desc {
        u64 addr;
        u32 len;
        u16 flags, next;
};
struct virtq_avail {
        u16 flags, idx;
        u16 ring[];
};
struct virtq_used_elem {
        u32 id, len;
};
struct virtq_used {
        u16 flags, idx;
        struct virtq_used_elem ring[];
};

struct virtq {
        struct virtio_dev *dev;
        u16 index, size;        /* size: a power of two */
        volatile struct virtq_desc *desc;
        volatile struct virtq_avail *avail;
        volatile struct virtq_used *used;
        u16 free_head, num_free;
        u16 avail_idx;          /* our copy of avail->idx */
        u16 kicked_idx;         /* avail_idx at the last notify */
        u16 last_used;          /* next used->ring entry to consume */
        void **token;           /* per head descriptor */
};

/*
 * Allocates the rings (4 KiB-aligned, from ram_alloc) for queue `index`
 * with min(size, QueueNumMax) entries (size must be a power of two), writes
 * QueueNum, the three addresses and QueueReady=1.  Returns 0 or -1.
 */
int virtq_init(struct virtio_dev *d, struct virtq *q, u16 index, u16 size);

struct vbuf {
        const void *addr;
        u32 len;
};
/*
 * Adds one chain: n_out device-readable buffers then n_in device-writable
 * ones, and publishes it in the avail ring (no notify).  Returns the head
 * index, or -1 if not enough free descriptors.  token must not be NULL.
 */
int virtq_add(struct virtq *q, const struct vbuf *b, int n_out, int n_in, void *token);
/* Writes QueueNotify if chains were added since the last kick (~3 us: ioeventfd). */
void virtq_kick(struct virtq *q);
/* Next completed chain: frees its descriptors, returns its token and sets
 * *len to the bytes the device wrote; NULL if none. */
void *virtq_get(struct virtq *q, u32 *len);
static inline int virtq_has_used(const struct virtq *q)
{
        return q->used->idx != q->last_used;
}

/*
 * ---- sleeping ----
 * virtio_idle(devs, n, seen): if a device's interrupt count moved since
 * its last acknowledgement, read InterruptStatus, write InterruptACK with it
 * (the line drops, so the next completion gives a new edge) and return 1:
 * the caller must poll its rings again.  Otherwise sleep until the next
 * interrupt after `seen` (taken with irq_total() BEFORE the caller last
 * polled its rings) and return 0.  The 100 Hz timer bounds every sleep.
 */
int virtio_idle(struct virtio_dev *const *devs, int n, u64 seen);
/*
 * Calls poll(arg) until it returns non-zero (returned) or timeout_us passes
 * (returns 0; timeout_us 0 = no timeout).  Busy-polls ~50 us after the last
 * call that was made, then sleeps with virtio_idle between polls.
 */
int virtio_wait(struct virtio_dev *const *devs, int n, int (*poll)(void *), void *arg,
                u64 timeout_us);

/* rdtsc-based deadlines. */
static inline u64 tsc_after_us(u64 us) { return rdtsc() + us * tsc_khz() / 1000; }
static inline int tsc_passed(u64 deadline) { return (i64)(rdtsc() - deadline) >= 0; }

#endif
