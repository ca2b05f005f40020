/*
 * disk: numbered, checksummed records on the first virtio-blk disk (the
 * VMM's block-device and checkpoint test).
 *   records=N    records to write this boot, 0 = until the disk is full (64)
 *   rate=N       records per second, 0 = unthrottled (0)
 *   flush=0|1    FLUSH after every record (1; skipped if the device lacks
 *                VIRTIO_BLK_F_FLUSH)
 *   report=N     print "disk: wrote=i" every N records, 0 = never (16)
 *   expect_ro=1  only check that a write is refused (below) (0)
 *   seed=N       payload seed (1)
 *
 * RECORD FORMAT.  Record i occupies bytes [i*4096, (i+1)*4096) of the disk
 * (sectors 8i .. 8i+7).  All integers little-endian u64:
 *   offset 0      magic    = 0x31434552434d564b (the ASCII bytes "KVMCREC1")
 *   offset 8      seq      = i
 *   offset 16     payload_seed = the seed parameter
 *   offset 24 + 8k, k = 0..507   payload word W(seq, seed, k):
 *                   z = (seed * 0x9E3779B97F4A7C15 + seq * 0xBF58476D1CE4E5B9
 *                        + (k + 1) * 0x94D049BB133111EB)  mod 2^64
 *                   z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) mod 2^64
 *                   z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) mod 2^64
 *                   W = z ^ (z >> 31)
 *   offset 4088   checksum = 64-bit FNV-1a over bytes [0, 4088):
 *                   h = 0xCBF29CE484222325; for each byte b: h = ((h ^ b) *
 *                   0x100000001B3) mod 2^64
 * A valid record has the magic, seq equal to its slot number, any
 * payload_seed, the payload derived from that payload_seed, and a matching
 * checksum.  (Python: struct.unpack_from("<3Q", rec) and "<Q" at 4088.)
 *
 * Boot scan, from slot 0 while the slot is not all zeros: a valid record
 * counts; anything else non-zero -> "disk: CORRUPT record=i" exit 1.  The
 * first all-zero slot ends the scan; if a valid record sits in one of the
 * next 4 slots -> "disk: GAP at record=i" (i = the zero slot) exit 1.
 * Prints "disk: found=F".
 *
 * Then writes records F, F+1, ... (each written, flushed if flush=1, read
 * back and compared), "disk: wrote=i" every `report` records (i = records
 * written this boot), and ends with
 * "disk: done found=F written=N total=T" exit 0.  At the end of the disk:
 * "disk: full at record=i" then the done line, exit 0.
 * expect_ro=1: after the scan, write record F once: IOERR -> "disk:
 * read-only ok" exit 0; success -> "disk: FAIL write to read-only disk
 * succeeded" exit 1.  I/O errors and timeouts: "disk: FAIL ..." exit 1.
 * No virtio-blk device: "disk: no virtio-blk device" exit 2.
 */
#include "guest.h"
#include "virtio_blk.h"

GUEST_PARAMS("records", "rate", "flush", "report", "expect_ro", "seed");

#define REC_SIZE        4096
#define REC_SECTORS     (REC_SIZE / 512)
#define REC_MAGIC       0x31434552434d564bull   /* "KVMCREC1" */
#define PAYLOAD_WORDS   508                     /* (4088 - 24) / 8 */
#define SCAN_BATCH      16                      /* records per read while scanning */

/*
 * Progress, for a VMM that wants to look (ELF symbol `disk_state`): magic
 * "KVMCDISK", record = the record number being written (or last scanned),
 * found/written as printed.
 */
struct disk_state {
        u64 magic;
        volatile u64 record;
        volatile u64 found, written;
        u64 seed;
};
struct disk_state disk_state __attribute__((used, aligned(64))) = {
        .magic = 0x4b534944434d564bull,
};

static struct vblk blk;

static u64 payload_word(u64 seq, u64 seed, u64 k)
{
        u64 z = seed * 0x9e3779b97f4a7c15ull + seq * 0xbf58476d1ce4e5b9ull +
                (k + 1) * 0x94d049bb133111ebull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
}

static u64 fnv1a(const u8 *p, u32 n)
{
        u64 h = 0xcbf29ce484222325ull;
        for (u32 i = 0; i < n; i++)
                h = (h ^ p[i]) * 0x100000001b3ull;
        return h;
}

static void make_record(u64 *w, u64 seq, u64 seed)
{
        w[0] = REC_MAGIC;
        w[1] = seq;
        w[2] = seed;
        for (u64 k = 0; k < PAYLOAD_WORDS; k++)
                w[3 + k] = payload_word(seq, seed, k);
        w[511] = fnv1a((const u8 *)w, REC_SIZE - 8);
}

static int all_zero(const u64 *w)
{
        for (int i = 0; i < REC_SIZE / 8; i++)
                if (w[i])
                        return 0;
        return 1;
}

static int valid_record(const u64 *w, u64 seq)
{
        if (w[0] != REC_MAGIC || w[1] != seq || w[511] != fnv1a((const u8 *)w, REC_SIZE - 8))
                return 0;
        for (u64 k = 0; k < PAYLOAD_WORDS; k++)
                if (w[3 + k] != payload_word(seq, w[2], k))
                        return 0;
        return 1;
}

static void __attribute__((noreturn)) io_fail(const char *what, u64 rec, int st)
{
        if (st == VBLK_TIMEOUT)
                printf("disk: FAIL %s record=%llu timeout\n", what, rec);
        else
                printf("disk: FAIL %s record=%llu status=%d\n", what, rec, st);
        guest_exit(EXIT_FAIL);
}

/* Reads `n` records starting at `first` into buf (n*4096 bytes). */
static void read_records(u64 first, u64 n, void *buf)
{
        int st = vblk_read(&blk, first * REC_SECTORS, buf, (u32)(n * REC_SIZE));
        if (st)
                io_fail("read", first, st);
}

/* The scan described at the top; returns F. */
static u64 scan(u64 slots, u64 *buf)
{
        u64 i = 0;
        while (i < slots) {
                u64 n = slots - i < SCAN_BATCH ? slots - i : SCAN_BATCH;
                read_records(i, n, buf);
                for (u64 j = 0; j < n; j++, i++) {
                        const u64 *w = buf + j * (REC_SIZE / 8);
                        disk_state.record = i;
                        if (all_zero(w)) {
                                /* End of the log: nothing valid may follow soon after. */
                                u64 m = slots - i - 1 < 4 ? slots - i - 1 : 4;
                                if (m) {
                                        read_records(i + 1, m, buf);
                                        for (u64 g = 0; g < m; g++)
                                                if (valid_record(buf + g * (REC_SIZE / 8), i + 1 + g)) {
                                                        printf("disk: GAP at record=%llu\n", i);
                                                        guest_exit(EXIT_FAIL);
                                                }
                                }
                                return i;
                        }
                        if (!valid_record(w, i)) {
                                printf("disk: CORRUPT record=%llu\n", i);
                                guest_exit(EXIT_FAIL);
                        }
                }
        }
        return i;
}

int main(void)
{
        u64 records = arg_u64("records", 64);
        u64 rate = arg_u64("rate", 0);
        u64 flush = arg_u64("flush", 1);
        u64 report = arg_u64("report", 16);
        u64 expect_ro = arg_u64("expect_ro", 0);
        u64 seed = arg_u64("seed", 1);
        disk_state.seed = seed;

        const struct virtio_mmio_info *info = virtio_find(VIRTIO_ID_BLK, 0);
        if (!info) {
                puts("disk: no virtio-blk device");
                return EXIT_BADARGS;
        }
        if (vblk_open(&blk, info, "disk"))
                return EXIT_FAIL;
        u64 slots = blk.capacity / REC_SECTORS;
        printf("disk: capacity=%llu sectors slots=%llu ro=%d flush=%d\n",
               blk.capacity, slots, blk.read_only, blk.has_flush);

        u64 *buf = ram_alloc(SCAN_BATCH * REC_SIZE);
        u64 *rec = ram_alloc(REC_SIZE);
        u64 found = scan(slots, buf);
        disk_state.found = found;
        printf("disk: found=%llu\n", found);

        if (expect_ro) {
                if (found >= slots) {
                        puts("disk: FAIL no free slot to try a write");
                        return EXIT_FAIL;
                }
                make_record(rec, found, seed);
                int st = vblk_write(&blk, found * REC_SECTORS, rec, REC_SIZE);
                if (st == VIRTIO_BLK_S_IOERR) {
                        puts("disk: read-only ok");
                        return EXIT_OK;
                }
                if (st == VIRTIO_BLK_S_OK) {
                        puts("disk: FAIL write to read-only disk succeeded");
                        return EXIT_FAIL;
                }
                io_fail("read-only write", found, st);
        }

        u64 period = rate ? tsc_khz() * 1000 / rate : 0;
        u64 t0 = rdtsc(), written = 0;
        int full = 0;
        while (!records || written < records) {
                u64 i = found + written;
                if (i >= slots) {
                        full = 1;
                        break;
                }
                disk_state.record = i;
                make_record(rec, i, seed);
                int st = vblk_write(&blk, i * REC_SECTORS, rec, REC_SIZE);
                if (st)
                        io_fail("write", i, st);
                if (flush && blk.has_flush && (st = vblk_flush(&blk)))
                        io_fail("flush", i, st);
                read_records(i, 1, buf);
                if (memcmp(buf, rec, REC_SIZE) || !valid_record(buf, i)) {
                        printf("disk: FAIL readback record=%llu\n", i);
                        return EXIT_FAIL;
                }
                written++;
                disk_state.written = written;
                if (report && written % report == 0)
                        printf("disk: wrote=%llu\n", written);
                if (period) {
                        /* Pace on rdtsc, sleeping on the 100 Hz timer in between. */
                        u64 due = t0 + written * period;
                        while ((i64)(rdtsc() - due) < 0)
                                wait_irq();
                }
        }
        if (full)
                printf("disk: full at record=%llu\n", found + written);
        printf("disk: done found=%llu written=%llu total=%llu\n", found, written,
               found + written);
        return EXIT_OK;
}
