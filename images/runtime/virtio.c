/*
 * virtio-mmio (virtio 1.x, Version 2) transport and split virtqueues.
 * See virtio.h for the API and the cost model behind it.
 */
#include "virtio.h"

/* ---- device table ---- */

#define MAX_VIRTIO 16

static struct virtio_mmio_info table[MAX_VIRTIO];
static int table_n = -1;        /* -1: command line not parsed yet */

static void bad_word(const char *w, const char *end)
{
        char buf[128];
        size_t n = (size_t)(end - w) < sizeof(buf) - 1 ? (size_t)(end - w) : sizeof(buf) - 1;
        memcpy(buf, w, n);
        buf[n] = 0;
        printf("guest: bad virtio_mmio.device word '%s'\n", buf);
        guest_exit(EXIT_BADARGS);
}

/* Linux's syntax: virtio_mmio.device=<size>@<base>:<irq>[:<id>] */
static void parse_table(void)
{
        static const char key[] = "virtio_mmio.device=";
        const size_t klen = sizeof(key) - 1;
        table_n = 0;
        const char *p = cmdline(), *w;
        while ((w = cmdline_word(&p))) {
                if ((size_t)(p - w) < klen || strncmp(w, key, klen))
                        continue;
                const char *q = w + klen;
                u64 size, base, irq, id;
                if (parse_u64(&q, p, &size, 1) || q >= p || *q++ != '@' ||
                    parse_u64(&q, p, &base, 0) || q >= p || *q++ != ':' ||
                    parse_u64(&q, p, &irq, 0))
                        bad_word(w, p);
                if (q < p && (*q++ != ':' || parse_u64(&q, p, &id, 0)))
                        bad_word(w, p);
                if (q != p || size < 0x100 || base >= 0x100000000ull || irq > 255)
                        bad_word(w, p);
                if (table_n == MAX_VIRTIO) {
                        printf("guest: more than %d virtio-mmio devices, extra ignored\n",
                               MAX_VIRTIO);
                        break;
                }
                struct virtio_mmio_info *e = &table[table_n];
                e->base = base;
                e->size = size;
                e->irq = (u32)irq;
                /* One MMIO read per register here, once per boot. */
                volatile u32 *r = (volatile u32 *)base;
                if (r[VIRTIO_MMIO_MAGIC / 4] != VIRTIO_MMIO_MAGIC_VALUE) {
                        printf("guest: no virtio-mmio magic at 0x%llx, ignored\n", base);
                        continue;
                }
                e->device_id = r[VIRTIO_MMIO_DEVICE_ID / 4];
                if (!e->device_id)
                        continue;       /* placeholder window without a device */
                table_n++;
        }
        /* Insertion sort by base: a stable order whatever the command line's. */
        for (int i = 1; i < table_n; i++)
                for (int j = i; j > 0 && table[j - 1].base > table[j].base; j--) {
                        struct virtio_mmio_info t = table[j];
                        table[j] = table[j - 1];
                        table[j - 1] = t;
                }
}

int virtio_device_count(void)
{
        if (table_n < 0)
                parse_table();
        return table_n;
}

const struct virtio_mmio_info *virtio_device(int i)
{
        return i >= 0 && i < virtio_device_count() ? &table[i] : 0;
}

const struct virtio_mmio_info *virtio_find(u32 device_id, int nth)
{
        for (int i = 0; i < virtio_device_count(); i++)
                if (table[i].device_id == device_id && nth-- == 0)
                        return &table[i];
        return 0;
}

/* ---- device set-up ---- */

u64 virtio_config64(const struct virtio_dev *d, u32 off)
{
        for (int tries = 0;; tries++) {
                u32 g = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
                u64 lo = virtio_read32(d, VIRTIO_MMIO_CONFIG + off);
                u64 hi = virtio_read32(d, VIRTIO_MMIO_CONFIG + off + 4);
                if (g == virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION) || tries == 10)
                        return lo | hi << 32;
        }
}

void virtio_reset(struct virtio_dev *d)
{
        virtio_write32(d, VIRTIO_MMIO_STATUS, 0);
        u64 end = tsc_after_us(100000);
        while (virtio_status(d) && !tsc_passed(end))
                delay_us(100);
}

static void set_status(struct virtio_dev *d, u32 bits)
{
        virtio_write32(d, VIRTIO_MMIO_STATUS, virtio_status(d) | bits);
}

int virtio_open(struct virtio_dev *d, const struct virtio_mmio_info *info,
                u64 wanted, const char *who)
{
        static int timer_on;
        memset(d, 0, sizeof(*d));
        d->base = info->base;
        d->irq = info->irq;
        d->device_id = info->device_id;
        d->vector = -1;
        if (virtio_read32(d, VIRTIO_MMIO_VERSION) != 2) {
                printf("%s: virtio-mmio at 0x%llx is not version 2 (legacy devices "
                       "are not supported)\n", who, d->base);
                return -1;
        }
        virtio_reset(d);
        set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
        set_status(d, VIRTIO_STATUS_DRIVER);
        u64 offered = 0;
        for (u32 sel = 0; sel < 2; sel++) {
                virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
                offered |= (u64)virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel);
        }
        if (!(offered & VIRTIO_F_VERSION_1)) {
                printf("%s: device at 0x%llx does not offer VIRTIO_F_VERSION_1\n", who, d->base);
                set_status(d, VIRTIO_STATUS_FAILED);
                return -1;
        }
        d->features = offered & (wanted | VIRTIO_F_VERSION_1);
        for (u32 sel = 0; sel < 2; sel++) {
                virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
                virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->features >> (32 * sel)));
        }
        set_status(d, VIRTIO_STATUS_FEATURES_OK);
        if (!(virtio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
                printf("%s: device at 0x%llx refused features 0x%llx\n", who, d->base,
                       d->features);
                set_status(d, VIRTIO_STATUS_FAILED);
                return -1;
        }
        d->vector = ioapic_route(d->irq);
        if (d->vector < 0)
                printf("%s: no IOAPIC pin for GSI %u, polling only\n", who, d->irq);
        d->irq_seen = irq_count(d->irq);
        if (!timer_on && this_cpu() == 0) {
                lapic_timer_periodic(100);
                timer_on = 1;
        }
        return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
        set_status(d, VIRTIO_STATUS_DRIVER_OK);
}

/* ---- split virtqueue ---- */

static void write_addr(struct virtio_dev *d, u32 lo_reg, const volatile void *p)
{
        virtio_write32(d, lo_reg, (u32)(u64)p);
        virtio_write32(d, lo_reg + 4, (u32)((u64)p >> 32));
}

int virtq_init(struct virtio_dev *d, struct virtq *q, u16 index, u16 size)
{
        memset(q, 0, sizeof(*q));
        virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
        if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY))
                return -1;      /* must not be live after a reset */
        u32 max = virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
        if (!max || !size || (size & (size - 1)))
                return -1;
        while (size > max)
                size >>= 1;     /* stays a power of two (max may not be one) */
        /*
         * One allocation: descriptors (16 B each), then the avail ring
         * (6 + 2n), then the used ring (6 + 8n) on its own 4 KiB boundary,
         * and the token array.
         */
        u64 desc_sz = 16ull * size, avail_sz = 6 + 2ull * size, used_sz = 6 + 8ull * size;
        u64 used_off = (desc_sz + avail_sz + 4095) & ~4095ull;
        u64 tok_off = (used_off + used_sz + 7) & ~7ull;
        u8 *mem = ram_alloc(tok_off + 8ull * size);
        q->dev = d;
        q->index = index;
        q->size = size;
        q->desc = (volatile struct virtq_desc *)mem;
        q->avail = (volatile struct virtq_avail *)(mem + desc_sz);
        q->used = (volatile struct virtq_used *)(mem + used_off);
        q->token = (void **)(mem + tok_off);
        for (u16 i = 0; i < size; i++)
                q->desc[i].next = (u16)(i + 1);
        q->free_head = 0;
        q->num_free = size;
        virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, size);
        write_addr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, q->desc);
        write_addr(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, q->avail);
        write_addr(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, q->used);
        virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
        return 0;
}

int virtq_add(struct virtq *q, const struct vbuf *b, int n_out, int n_in, void *token)
{
        int n = n_out + n_in;
        if (n <= 0 || n > q->num_free)
                return -1;
        u16 head = q->free_head, i = head, last = head;
        for (int k = 0; k < n; k++) {
                volatile struct virtq_desc *d = &q->desc[i];
                d->addr = (u64)b[k].addr;
                d->len = b[k].len;
                d->flags = (u16)((k < n - 1 ? VIRTQ_DESC_F_NEXT : 0) |
                                 (k >= n_out ? VIRTQ_DESC_F_WRITE : 0));
                last = i;
                i = d->next;
        }
        q->free_head = q->desc[last].next;
        q->num_free = (u16)(q->num_free - n);
        q->token[head] = token;
        q->avail->ring[q->avail_idx & (q->size - 1)] = head;
        /* x86 keeps stores in order; stop the compiler from reordering them. */
        __asm__ volatile("" ::: "memory");
        q->avail->idx = ++q->avail_idx;
        return head;
}

void virtq_kick(struct virtq *q)
{
        if (q->kicked_idx == q->avail_idx)
                return;
        q->kicked_idx = q->avail_idx;
        /* The UC store is ordered after the ring stores (x86 TSO). */
        virtio_write32(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

void *virtq_get(struct virtq *q, u32 *len)
{
        u32 id;
        void *token;
        do {
                if (q->used->idx == q->last_used)
                        return 0;
                __asm__ volatile("" ::: "memory");      /* idx before the entry */
                volatile struct virtq_used_elem *e =
                        &q->used->ring[q->last_used & (q->size - 1)];
                id = e->id;
                if (len)
                        *len = e->len;
                q->last_used++;
                /* A broken device must not crash us: skip ids not in flight. */
                token = id < q->size ? q->token[id] : 0;
        } while (!token);
        q->token[id] = 0;
        /* Give the chain back to the free list. */
        u16 i = (u16)id, n = 1;
        while ((q->desc[i].flags & VIRTQ_DESC_F_NEXT) && n <= q->size) {
                i = q->desc[i].next;
                n++;
        }
        q->desc[i].next = q->free_head;
        q->free_head = (u16)id;
        q->num_free = (u16)(q->num_free + n);
        return token;
}

/* ---- sleeping ---- */

int virtio_idle(struct virtio_dev *const *devs, int n, u64 seen)
{
        int moved = 0;
        for (int i = 0; i < n; i++) {
                struct virtio_dev *d = devs[i];
                u64 c = irq_count(d->irq);
                /* No pin: nobody counts, poll InterruptStatus is pointless too. */
                if (d->vector < 0 || c == d->irq_seen)
                        continue;
                d->irq_seen = c;
                u32 isr = virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
                if (isr) {
                        virtio_write32(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
                        d->isr_seen |= isr;
                }
                moved = 1;
        }
        if (moved)
                return 1;
        wait_irq_since(seen);
        return 0;
}

int virtio_wait(struct virtio_dev *const *devs, int n, int (*poll)(void *), void *arg,
                u64 timeout_us)
{
        u64 end = timeout_us ? tsc_after_us(timeout_us) : 0;
        u64 spin_end = tsc_after_us(50);
        for (;;) {
                u64 seen = irq_total();
                int r = poll(arg);
                if (r)
                        return r;
                if (end && tsc_passed(end))
                        return 0;
                if (!tsc_passed(spin_end)) {
                        cpu_relax();
                        continue;
                }
                virtio_idle(devs, n, seen);
        }
}
