/*
 * blkbench: sequential virtio-blk throughput, measured inside the guest.
 *   mb=N    MiB to write, then read back (default 64; must fit on the disk)
 *   req=N   request size in bytes (default 64K; a multiple of 512, <= 1M)
 * Writes the first N MiB of the first disk with req-sized requests, flushes,
 * then reads them back and checks every sector's stamp.  Prints
 *   "blkbench: write bytes=B req=R cycles=C"
 *   "blkbench: read bytes=B req=R cycles=C"
 * (cycles of rdtsc around each phase; the flush is part of the write phase).
 */
#include "virtio_blk.h"

GUEST_PARAMS("mb", "req");

#define SECTOR 512

int main(void)
{
        u64 total = arg_u64("mb", 64) << 20;
        u64 req = arg_u64("req", 65536);
        if (!req || req % SECTOR || req > (1 << 20) || !total || total % req) {
                printf("blkbench: req must be a multiple of 512 up to 1M dividing mb\n");
                return EXIT_BADARGS;
        }
        const struct virtio_mmio_info *info = virtio_find(VIRTIO_ID_BLK, 0);
        if (!info) {
                puts("blkbench: no virtio-blk device");
                return EXIT_BADARGS;
        }
        static struct vblk b;
        if (vblk_open(&b, info, "blkbench"))
                return EXIT_FAIL;
        if (total / SECTOR > b.capacity) {
                printf("blkbench: disk has %llu MiB, mb=%llu does not fit\n",
                       b.capacity * SECTOR >> 20, total >> 20);
                return EXIT_BADARGS;
        }
        u64 *buf = ram_alloc(req);

        /* Each sector starts with its own number: cheap to stamp and to check. */
        u64 t0 = rdtsc();
        for (u64 off = 0; off < total; off += req) {
                for (u64 s = 0; s < req / SECTOR; s++)
                        buf[s * SECTOR / 8] = off / SECTOR + s;
                int st = vblk_write(&b, off / SECTOR, buf, (u32)req);
                if (st != VIRTIO_BLK_S_OK) {
                        printf("blkbench: FAIL write at sector %llu status %d\n", off / SECTOR, st);
                        return EXIT_FAIL;
                }
        }
        if (b.has_flush && vblk_flush(&b) != VIRTIO_BLK_S_OK) {
                puts("blkbench: FAIL flush");
                return EXIT_FAIL;
        }
        u64 t1 = rdtsc();
        printf("blkbench: write bytes=%llu req=%llu cycles=%llu\n", total, req, t1 - t0);

        t0 = rdtsc();
        for (u64 off = 0; off < total; off += req) {
                int st = vblk_read(&b, off / SECTOR, buf, (u32)req);
                if (st != VIRTIO_BLK_S_OK) {
                        printf("blkbench: FAIL read at sector %llu status %d\n", off / SECTOR, st);
                        return EXIT_FAIL;
                }
                for (u64 s = 0; s < req / SECTOR; s++)
                        if (buf[s * SECTOR / 8] != off / SECTOR + s) {
                                printf("blkbench: FAIL sector %llu reads back %llu\n",
                                       off / SECTOR + s, buf[s * SECTOR / 8]);
                                return EXIT_FAIL;
                        }
        }
        t1 = rdtsc();
        printf("blkbench: read bytes=%llu req=%llu cycles=%llu\n", total, req, t1 - t0);
        return EXIT_OK;
}
