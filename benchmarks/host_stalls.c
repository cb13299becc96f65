/* host_stalls: how often a plain read of resident memory stalls on this host.
 *
 * No QEMU, no loader, no file: for each size an anonymous region (4 KiB
 * pages, MADV_NOHUGEPAGE) is touched once, then, round after round and
 * size after size (interleaved, so the host's drift hits every size alike),
 * N random 4 KiB pages are each copied out with one memcpy and timed.
 * A restore's request path does several such accesses per page (the
 * loader's read of the file page, QEMU's copy into guest RAM, the vCPU's
 * read), so a host where a share of them stall sets a floor under the
 * request latency tail (benchmarks/README.md, "Where the 4 GiB tail comes
 * from").
 *
 *   cc -std=c11 -O2 -Wall -Wextra -Werror -o host_stalls benchmarks/host_stalls.c
 *   ./host_stalls --sizes 1G,4G --reads 2000000 --rounds 3
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096ul
#define MAX_SIZES 8

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* median over rounds of column s of a rounds x nsizes table */
static double median_of(const double *table, int s, int nsizes, long rounds)
{
    double col[1000];
    for (long r = 0; r < rounds; r++)
        col[r] = table[r * nsizes + s];
    qsort(col, (size_t)rounds, sizeof *col, cmp_double);
    return col[rounds / 2];
}

static int parse_size(const char *s, size_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s)
        return -1;
    switch (*end) {
    case 'G': v <<= 30; end++; break;
    case 'M': v <<= 20; end++; break;
    case '\0': break;
    default: return -1;
    }
    if (*end || v < 16 * PAGE || v > (1ull << 40))
        return -1;
    *out = (size_t)(v & ~(PAGE - 1));
    return 0;
}

/* the whole string as a number; callers check the range (and wholeness) */
static int parse_number(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

static int usage(const char *why)
{
    fprintf(stderr, "host_stalls: %s\nusage: host_stalls --sizes SIZE[,SIZE...] "
            "[--reads N] [--rounds N] [--threshold-us US]\n"
            "  SIZE: bytes, or with a suffix M or G (64 KiB..1 TiB); at most %d sizes\n", why, MAX_SIZES);
    return 2;
}

int main(int argc, char **argv)
{
    size_t sizes[MAX_SIZES];
    int nsizes = 0;
    long reads = 2000000, rounds = 3;
    double thresh = 20.0, num;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return usage("every option takes a value");
        i++;
        if (!strcmp(a, "--sizes")) {
            char *copy = strdup(v), *save = NULL;
            if (!copy) {
                fprintf(stderr, "host_stalls: out of memory\n");
                return 1;
            }
            for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (nsizes == MAX_SIZES || parse_size(t, &sizes[nsizes]) < 0) {
                    free(copy);
                    return usage("bad --sizes (want e.g. 1G,4G)");
                }
                nsizes++;
            }
            free(copy);
        } else if (!strcmp(a, "--reads")) {
            if (parse_number(v, &num) < 0 || num < 100 || num > 100000000
                || num != (double)(long)num)
                return usage("--reads wants 100..100000000");
            reads = (long)num;
        } else if (!strcmp(a, "--rounds")) {
            if (parse_number(v, &num) < 0 || num < 1 || num > 1000 || num != (double)(long)num)
                return usage("--rounds wants 1..1000");
            rounds = (long)num;
        } else if (!strcmp(a, "--threshold-us")) {
            if (parse_number(v, &thresh) < 0 || !(thresh > 0 && thresh < 1e6))
                return usage("--threshold-us wants a positive number of microseconds");
        } else {
            return usage("unknown option");
        }
    }
    if (!nsizes)
        return usage("--sizes is required");

    unsigned char *regions[MAX_SIZES];
    for (int s = 0; s < nsizes; s++) {
        regions[s] = mmap(NULL, sizes[s], PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (regions[s] == MAP_FAILED) {
            fprintf(stderr, "host_stalls: mmap %zu bytes: %s\n", sizes[s], strerror(errno));
            return 1;
        }
        madvise(regions[s], sizes[s], MADV_NOHUGEPAGE);
        double t0 = now_us();
        for (size_t off = 0; off < sizes[s]; off += PAGE)
            regions[s][off] = (unsigned char)(off >> 12) | 1;
        double t = (now_us() - t0) / 1e6;
        printf("%zu MiB: first touch %.2f s (%.0f MiB/s)\n", sizes[s] >> 20, t,
               (double)(sizes[s] >> 20) / t);
    }

    double *lat = malloc(sizeof *lat * (size_t)reads);
    double *share = calloc((size_t)(nsizes * rounds), sizeof *share);
    double *p99 = calloc((size_t)(nsizes * rounds), sizeof *p99);
    if (!lat || !share || !p99) {
        fprintf(stderr, "host_stalls: out of memory for %ld samples\n", reads);
        return 1;
    }
    static unsigned char dst[PAGE];
    uint64_t x = 88172645463325252ull;
    for (long r = 0; r < rounds; r++) {
        for (int s = 0; s < nsizes; s++) {
            size_t pages = sizes[s] / PAGE;
            for (long i = 0; i < reads; i++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                const unsigned char *p = regions[s] + (x % pages) * PAGE;
                double t0 = now_us();
                memcpy(dst, p, PAGE);
                __asm__ volatile("" : : "r"(dst) : "memory");
                lat[i] = now_us() - t0;
            }
            qsort(lat, (size_t)reads, sizeof *lat, cmp_double);
            long over = 0;
            for (long i = 0; i < reads; i++)
                over += lat[i] > thresh;
            share[r * nsizes + s] = 100.0 * (double)over / (double)reads;
            p99[r * nsizes + s] = lat[reads * 99 / 100];
            printf("round %ld, %zu MiB: p50 %.2f p99 %.2f p99.9 %.2f max %.0f us; "
                   "%.3f%% of reads over %g us\n", r + 1, sizes[s] >> 20, lat[reads / 2],
                   lat[reads * 99 / 100], lat[reads * 999 / 1000], lat[reads - 1],
                   share[r * nsizes + s], thresh);
        }
    }
    for (int s = 0; s < nsizes; s++) {
        double share_med = median_of(share, s, nsizes, rounds);
        double p99_med = median_of(p99, s, nsizes, rounds);
        printf("%zu MiB: median p99 %.2f us, %.3f%% of reads over %g us", sizes[s] >> 20,
               p99_med, share_med, thresh);
        double base_share = median_of(share, 0, nsizes, rounds);
        double base_p99 = median_of(p99, 0, nsizes, rounds);
        if (s > 0 && base_share > 0 && base_p99 > 0)
            printf(" (%.1fx the %zu MiB p99, %.1fx its share)", p99_med / base_p99,
                   sizes[0] >> 20, share_med / base_share);
        printf("\n");
    }
    free(lat);
    free(share);
    free(p99);
    for (int s = 0; s < nsizes; s++)
        munmap(regions[s], sizes[s]);
    return 0;
}
