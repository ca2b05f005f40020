/*
 * virtio-blk: request = header (device-readable), data, status byte
 * (device-writable, last).  One request at a time is all the test
 * workloads need, and it keeps the driver short.
 */
#include "virtio_blk.h"

int vblk_open(struct vblk *b, const struct virtio_mmio_info *info, const char *who)
{
        memset(b, 0, sizeof(*b));
        if (virtio_open(&b->dev, info, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, who))
                return -1;
        if (virtq_init(&b->dev, &b->q, 0, 16)) {
                printf("%s: cannot set up the virtio-blk queue\n", who);
                return -1;
        }
        b->capacity = virtio_config64(&b->dev, 0);
        b->read_only = !!(b->dev.features & VIRTIO_BLK_F_RO);
        b->has_flush = !!(b->dev.features & VIRTIO_BLK_F_FLUSH);
        u8 *scratch = ram_alloc(4096);
        b->hdr = (struct virtio_blk_req_hdr *)scratch;
        b->status = scratch + 64;
        virtio_driver_ok(&b->dev);
        return 0;
}

static int blk_done(void *arg)
{
        struct vblk *b = arg;
        return virtq_get(&b->q, 0) != 0;
}

int vblk_request(struct vblk *b, u32 type, u64 sector, void *buf, u32 len, u64 timeout_us)
{
        b->hdr->type = type;
        b->hdr->reserved = 0;
        b->hdr->sector = sector;
        *b->status = 0xff;              /* the device must overwrite it */
        struct vbuf v[3];
        int n = 0, n_out = 1;
        v[n++] = (struct vbuf){ b->hdr, sizeof(*b->hdr) };
        if (len) {
                v[n++] = (struct vbuf){ buf, len };
                if (type == VIRTIO_BLK_T_OUT)
                        n_out = 2;
        }
        v[n++] = (struct vbuf){ (const void *)b->status, 1 };
        if (virtq_add(&b->q, v, n_out, n - n_out, b) < 0)
                return VBLK_TIMEOUT;    /* queue still full of timed-out requests */
        virtq_kick(&b->q);
        struct virtio_dev *d = &b->dev;
        if (!virtio_wait(&d, 1, blk_done, b, timeout_us))
                return VBLK_TIMEOUT;
        return *b->status;
}
