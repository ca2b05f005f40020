/*
 * virtio-blk driver: one queue, synchronous requests (one in flight).
 */
#ifndef KVMCOLO_VIRTIO_BLK_H
#define KVMCOLO_VIRTIO_BLK_H

#include "virtio.h"

#define VIRTIO_BLK_F_RO         (1ull << 5)
#define VIRTIO_BLK_F_FLUSH      (1ull << 9)

#define VIRTIO_BLK_T_IN         0
#define VIRTIO_BLK_T_OUT        1
#define VIRTIO_BLK_T_FLUSH      4
#define VIRTIO_BLK_T_GET_ID     8

#define VIRTIO_BLK_S_OK         0
#define VIRTIO_BLK_S_IOERR      1
#define VIRTIO_BLK_S_UNSUPP     2
#define VBLK_TIMEOUT            (-1)    /* no completion within the timeout */

struct virtio_blk_req_hdr {
        u32 type, reserved;
        u64 sector;
};

struct vblk {
        struct virtio_dev dev;
        struct virtq q;
        u64 capacity;                   /* 512-byte sectors */
        int read_only, has_flush;
        struct virtio_blk_req_hdr *hdr; /* DMA scratch: header and status byte */
        volatile u8 *status;
};

/* Full device set-up (features RO and FLUSH if offered).  0 or -1. */
int vblk_open(struct vblk *b, const struct virtio_mmio_info *info, const char *who);
/*
 * One request, waited for (sleeping on the device interrupt) up to
 * timeout_us.  buf/len: the data (len a multiple of 512 for IN/OUT, 0 for
 * FLUSH).  Returns VIRTIO_BLK_S_* or VBLK_TIMEOUT.  After a timeout the
 * request is still the device's: do not reuse buf.
 */
int vblk_request(struct vblk *b, u32 type, u64 sector, void *buf, u32 len, u64 timeout_us);

#define VBLK_DEFAULT_TIMEOUT_US 10000000ull
static inline int vblk_read(struct vblk *b, u64 sector, void *buf, u32 len)
{
        return vblk_request(b, VIRTIO_BLK_T_IN, sector, buf, len, VBLK_DEFAULT_TIMEOUT_US);
}
static inline int vblk_write(struct vblk *b, u64 sector, const void *buf, u32 len)
{
        return vblk_request(b, VIRTIO_BLK_T_OUT, sector, (void *)buf, len,
                            VBLK_DEFAULT_TIMEOUT_US);
}
static inline int vblk_flush(struct vblk *b)
{
        return vblk_request(b, VIRTIO_BLK_T_FLUSH, 0, 0, 0, VBLK_DEFAULT_TIMEOUT_US);
}

#endif
