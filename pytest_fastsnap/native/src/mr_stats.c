/* Owns latency samples, percentiles and log2 histograms (see mr_stats.h). */
#include "mr_stats.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void mr_samples_add(mr_samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        size_t ncap = s->cap ? s->cap * 2 : 4096;
        uint64_t *v = realloc(s->ns, ncap * sizeof *v);
        if (!v) {
            s->dropped++;
            return;
        }
        s->ns = v;
        s->cap = ncap;
    }
    s->ns[s->n++] = ns;
}

void mr_samples_merge(mr_samples *dst, mr_samples *src)
{
    if (!src->n)
        return;
    uint64_t *v = realloc(dst->ns, (dst->n + src->n) * sizeof *v);
    if (!v) {
        dst->dropped += src->n + src->dropped;
    } else {
        memcpy(v + dst->n, src->ns, src->n * sizeof *v);
        dst->ns = v;
        dst->n += src->n;
        dst->cap = dst->n;
        dst->dropped += src->dropped;
    }
    mr_samples_free(src);
}

void mr_samples_free(mr_samples *s)
{
    free(s->ns);
    memset(s, 0, sizeof *s);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

void mr_samples_sort(mr_samples *s)
{
    if (s->n)
        qsort(s->ns, s->n, sizeof *s->ns, cmp_u64);
}

double mr_samples_pct_us(const mr_samples *s, double q)
{
    if (!s->n)
        return 0.0;
    double rank = ceil(q * (double)s->n);   /* nearest rank, 1-based */
    size_t i = rank < 1 ? 0 : (size_t)rank - 1;
    return (double)s->ns[i < s->n ? i : s->n - 1] / 1000.0;
}

unsigned mr_hist_bucket(uint64_t ns)
{
    uint64_t us = ns / 1000;
    unsigned k = 0;
    while (us > 1 && k < MR_HIST_BUCKETS - 1) {
        us >>= 1;
        k++;
    }
    return k;
}

void mr_samples_json(FILE *out, mr_samples *s)
{
    mr_samples_sort(s);
    uint64_t hist[MR_HIST_BUCKETS] = {0};
    for (size_t i = 0; i < s->n; i++)
        hist[mr_hist_bucket(s->ns[i])]++;
    fprintf(out, "{\"count\":%zu,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f,"
            "\"histogram_log2_us\":[", s->n, mr_samples_pct_us(s, 0.5),
            mr_samples_pct_us(s, 0.9), mr_samples_pct_us(s, 0.99), mr_samples_pct_us(s, 1.0));
    unsigned last = 0;
    for (unsigned k = 0; k < MR_HIST_BUCKETS; k++)
        if (hist[k])
            last = k;
    for (unsigned k = 0; s->n && k <= last; k++)
        fprintf(out, "%s{\"ge_us\":%llu,\"count\":%" PRIu64 "}", k ? "," : "",
                k ? 1ull << k : 0ull, hist[k]);
    fputs("]}", out);
}
