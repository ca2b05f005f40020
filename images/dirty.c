/*
 * dirty: rewrites a working set at CPL3 and checks its own invariants
 * (the VMM's dirty-tracking / checkpoint test and CPL3 memory benchmark).
 *   pages=N   working set in 4 KiB pages of free RAM after the image (256)
 *   passes=N  0 = forever (0)
 *   rate=N    passes per second, 0 = unthrottled; paced on rdtsc (0)
 *   report=N  print "dirty: pass=P ok" every N passes, 0 = never (100)
 *   seed=N    pattern seed (1)
 *
 * Word w of page p holds pattern(pass, p) ^ w, where
 *   pattern(pass, p) = pass * 0x9E3779B97F4A7C15 ^ p << 20 ^ seed.
 * The multiplier is odd, so consecutive passes always differ; pages differ
 * in bits 20+ and words in bits 0..8, so stale, zeroed or swapped pages and
 * words are all detected.  Pass 0 is written at start-up; pass i checks
 * every word for pass i-1 before overwriting it with pass i (check and write
 * are fused per word: each word is verified before it is overwritten, which
 * is what the check needs, in a single sweep of the working set).
 */
#include "guest.h"

GUEST_PARAMS("pages", "passes", "rate", "report", "seed");

#define WORDS_PER_PAGE 512
#define GOLDEN 0x9e3779b97f4a7c15ull

/*
 * Progress, for a VMM that wants to look inside (ELF symbol `dirty_state`):
 * magic "KVMCDRTY", pass = last completed pass, checksum = sum of the
 * per-page pattern bases written in that pass, base/pages = working set.
 */
struct dirty_state {
        u64 magic;
        volatile u64 pass;
        volatile u64 checksum;
        u64 base;
        u64 pages;
        u64 seed;
};
struct dirty_state dirty_state __attribute__((used, aligned(64))) = {
        .magic = 0x595452444d43564bull,         /* "KVMCDRTY" little-endian */
};

static inline u64 pattern(u64 seed, u64 pass, u64 page)
{
        return (pass * GOLDEN) ^ (page << 20) ^ seed;
}

static void __attribute__((noinline, noreturn))
fail(u64 pass, u64 page, u64 word, u64 expected, u64 got)
{
        printf("dirty: FAIL pass=%llu page=%llu word=%llu expected=0x%llx got=0x%llx\n",
               pass, page, word, expected, got);
        guest_exit(EXIT_FAIL);
}

int main(void)
{
        u64 pages = arg_u64("pages", 256);
        u64 passes = arg_u64("passes", 0);
        u64 rate = arg_u64("rate", 0);
        u64 report = arg_u64("report", 100);
        u64 seed = arg_u64("seed", 1);

        u64 max = (free_ram_end() - free_ram_start()) / 4096;
        if (pages == 0) {
                puts("dirty: pages must be > 0");
                return EXIT_BADARGS;
        }
        if (pages > max) {
                printf("dirty: pages=%llu does not fit in RAM (max %llu)\n", pages, max);
                return EXIT_BADARGS;
        }
        u64 *ws = (u64 *)free_ram_start();
        dirty_state.base = (u64)ws;
        dirty_state.pages = pages;
        dirty_state.seed = seed;

        printf("dirty: start pages=%llu passes=%llu rate=%llu seed=%llu base=0x%llx\n",
               pages, passes, rate, seed, (u64)ws);

        u64 sum = 0;
        for (u64 p = 0; p < pages; p++) {
                u64 v = pattern(seed, 0, p);
                u64 *w = ws + p * WORDS_PER_PAGE;
                for (u64 j = 0; j < WORDS_PER_PAGE; j++)
                        w[j] = v ^ j;
                sum += v;
        }
        dirty_state.checksum = sum;

        u64 period = rate ? tsc_khz() * 1000 / rate : 0;
        u64 t0 = rdtsc();
        for (u64 pass = 1; !passes || pass <= passes; pass++) {
                u64 *w = ws;
                sum = 0;
                for (u64 p = 0; p < pages; p++, w += WORDS_PER_PAGE) {
                        u64 old = pattern(seed, pass - 1, p);
                        u64 new = pattern(seed, pass, p);
                        for (u64 j = 0; j < WORDS_PER_PAGE; j++) {
                                u64 got = w[j];
                                if (__builtin_expect(got != (old ^ j), 0))
                                        fail(pass, p, j, old ^ j, got);
                                w[j] = new ^ j;
                        }
                        sum += new;
                }
                dirty_state.checksum = sum;
                dirty_state.pass = pass;
                if (report && pass % report == 0)
                        printf("dirty: pass=%llu ok\n", pass);
                if (period) {
                        u64 due = t0 + pass * period;
                        while ((i64)(rdtsc() - due) < 0)
                                cpu_relax();
                }
        }
        printf("dirty: done passes=%llu\n", passes);
        return EXIT_OK;
}
