/*
 * badvirtio: a deliberately misbehaving virtio-blk driver, for the VMM's
 * robustness tests.  Needs two virtio-blk devices: the first (lowest MMIO
 * base) is the victim, the second the witness.
 *   mode=M   what to do to the victim (none):
 *     none     behave: one valid 512-byte read
 *     oob      a data descriptor at 1 << 46, far outside RAM
 *     loop     a descriptor chain whose last `next` points back at its head
 *     badnext  the header descriptor's `next` is >= the queue size
 *     hugelen  a device-writable data descriptor of length 0xFFFFFFF0
 *     qsize    QueueNum = 100 (not a power of two), then a valid request
 *     early    queue set up and QueueNotify written before DRIVER_OK, then
 *              a normal request after DRIVER_OK
 * After the bad action it waits up to ~200 ms (a completion or an
 * interrupt ends the wait early), reads the victim's Status and prints
 *   badvirtio: mode=M status=0x%x needs_reset=%d
 * (plus a "badvirtio: victim used=U isr=0x.." detail line).  Then it
 * writes, reads back and compares one sector on the witness:
 * "badvirtio: witness ok" exit 0, or "badvirtio: FAIL witness ..." exit 1.
 * Every wait is bounded, so whatever the VMM does the guest ends.
 */
#include "guest.h"
#include "virtio_blk.h"

GUEST_PARAMS("mode");

static const char *const modes[] = {
        "none", "oob", "loop", "badnext", "hugelen", "qsize", "early", 0
};

static struct virtio_dev vd;
static struct virtq q;
static struct virtio_blk_req_hdr *hdr;
static u8 *data, *status;
static u64 irq0;

static void fill_req(volatile struct virtq_desc *d, u64 data_addr, u32 data_len)
{
        hdr->type = VIRTIO_BLK_T_IN;
        hdr->reserved = 0;
        hdr->sector = 0;
        *status = 0xff;
        d[0] = (struct virtq_desc){ (u64)hdr, sizeof(*hdr), VIRTQ_DESC_F_NEXT, 1 };
        d[1] = (struct virtq_desc){ data_addr, data_len,
                                    VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2 };
        d[2] = (struct virtq_desc){ (u64)status, 1, VIRTQ_DESC_F_WRITE, 0 };
}

/* Publishes head 0 in the avail ring by hand (the chain is not virtq_add's). */
static void publish(volatile struct virtq_avail *avail, u16 *idx, u16 size)
{
        avail->ring[*idx % size] = 0;
        __asm__ volatile("" ::: "memory");
        avail->idx = ++*idx;
}

struct waitfor {
        volatile struct virtq_used *used;
        u16 target;
};

static int victim_news(void *arg)
{
        struct waitfor *w = arg;
        if (w->used && (u16)(w->used->idx - w->target) < 0x8000)
                return 1;                       /* completion(s) arrived */
        return irq_count(vd.irq) != irq0;       /* e.g. a config-change interrupt */
}

static void wait_victim(volatile struct virtq_used *used, u16 target, u64 us)
{
        struct waitfor w = { used, target };
        struct virtio_dev *d = &vd;
        virtio_wait(&d, 1, victim_news, &w, us);
}

/* QueueNum = 100 by hand: virtq_init insists on powers of two. */
static void qsize_mode(void)
{
        const u16 n = 100;
        u8 *mem = ram_alloc(3 * 4096);
        volatile struct virtq_desc *desc = (void *)mem;
        volatile struct virtq_avail *avail = (void *)(mem + 4096);
        volatile struct virtq_used *used = (void *)(mem + 8192);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_SEL, 0);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_NUM, n);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)desc);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)avail);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)used);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_READY, 1);
        virtio_driver_ok(&vd);
        u16 idx = 0;
        fill_req(desc, (u64)data, 512);
        publish(avail, &idx, n);
        irq0 = irq_count(vd.irq);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        wait_victim(used, 1, 200000);
        printf("badvirtio: victim used=%u status_byte=0x%x\n", used->idx, *status);
}

static void victim(const char *mode)
{
        if (!strcmp(mode, "qsize")) {
                qsize_mode();
                return;
        }
        if (virtq_init(&vd, &q, 0, 16)) {
                puts("badvirtio: FAIL cannot set up the victim's queue");
                guest_exit(EXIT_FAIL);
        }
        int early = !strcmp(mode, "early");
        if (!early)
                virtio_driver_ok(&vd);
        volatile struct virtq_desc *d = q.desc;
        fill_req(d, (u64)data, 512);
        if (!strcmp(mode, "oob"))
                d[1].addr = 1ull << 46;
        else if (!strcmp(mode, "loop"))
                d[2].flags |= VIRTQ_DESC_F_NEXT, d[2].next = 0;
        else if (!strcmp(mode, "badnext"))
                d[0].next = (u16)(q.size + 5);
        else if (!strcmp(mode, "hugelen"))
                d[1].len = 0xfffffff0u;
        u16 idx = 0;
        publish(q.avail, &idx, q.size);
        irq0 = irq_count(vd.irq);
        virtio_write32(&vd, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        if (early) {
                /* Notified before DRIVER_OK; now go live and ask again. */
                wait_victim(q.used, 1, 50000);
                virtio_driver_ok(&vd);
                volatile struct virtq_desc *e = q.desc + 3;
                fill_req(e, (u64)data, 512);
                e[0].next = 4;
                e[1].next = 5;
                q.avail->ring[idx % q.size] = 3;
                __asm__ volatile("" ::: "memory");
                q.avail->idx = ++idx;
                irq0 = irq_count(vd.irq);
                virtio_write32(&vd, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
                wait_victim(q.used, 2, 200000);
        } else {
                wait_victim(q.used, 1, 200000);
        }
        printf("badvirtio: victim used=%u status_byte=0x%x\n", q.used->idx, *status);
}

int main(void)
{
        const char *mode = arg_str("mode", "none");
        int known = 0;
        for (int i = 0; modes[i]; i++)
                known |= !strcmp(mode, modes[i]);
        if (!known) {
                printf("badvirtio: unknown mode '%s'\n", mode);
                return EXIT_BADARGS;
        }
        const struct virtio_mmio_info *vi = virtio_find(VIRTIO_ID_BLK, 0);
        const struct virtio_mmio_info *wi = virtio_find(VIRTIO_ID_BLK, 1);
        if (!wi) {
                puts("badvirtio: needs two virtio-blk devices (victim, witness)");
                return EXIT_BADARGS;
        }
        u8 *scratch = ram_alloc(2 * 4096);
        hdr = (void *)scratch;
        status = scratch + 64;
        data = scratch + 4096;

        if (virtio_open(&vd, vi, VIRTIO_BLK_F_FLUSH, "badvirtio"))
                return EXIT_FAIL;
        victim(mode);
        u32 st = virtio_status(&vd);
        printf("badvirtio: mode=%s status=0x%x needs_reset=%d\n", mode, st,
               !!(st & VIRTIO_STATUS_NEEDS_RESET));
        /* Acknowledge whatever the victim raised, so its line drops. */
        u32 isr = virtio_read32(&vd, VIRTIO_MMIO_INTERRUPT_STATUS);
        if (isr)
                virtio_write32(&vd, VIRTIO_MMIO_INTERRUPT_ACK, isr);

        static struct vblk w;
        if (vblk_open(&w, wi, "badvirtio")) {
                puts("badvirtio: FAIL witness (set-up)");
                return EXIT_FAIL;
        }
        u8 *out = ram_alloc(4096), *in = ram_alloc(4096);
        u64 r = random_u64();
        for (int i = 0; i < 512; i++)
                out[i] = (u8)(r >> (8 * (i & 7))) ^ (u8)i;
        int s1 = vblk_request(&w, VIRTIO_BLK_T_OUT, 0, out, 512, 2000000);
        int s2 = s1 ? s1 : vblk_request(&w, VIRTIO_BLK_T_IN, 0, in, 512, 2000000);
        if (s1 || s2 || memcmp(in, out, 512)) {
                printf("badvirtio: FAIL witness write=%d read=%d\n", s1, s2);
                return EXIT_FAIL;
        }
        puts("badvirtio: witness ok");
        return EXIT_OK;
}
