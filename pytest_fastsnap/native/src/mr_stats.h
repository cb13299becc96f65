/* The loader's one latency statistics implementation: a growable array of
 * nanosecond samples, nearest-rank percentiles and a log2 histogram, used by
 * the local loader (fault and touch latencies, uffd round trip) and the
 * bridge (request -> page sent), so the same latencies give the same p99. */
#ifndef FASTSNAP_MR_STATS_H
#define FASTSNAP_MR_STATS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define MR_HIST_BUCKETS 32

typedef struct mr_samples {
    uint64_t *ns;
    size_t n, cap;
    uint64_t dropped;       /* samples lost to a failed allocation */
} mr_samples;

/* Appends one sample (grows the array; on out-of-memory counts it in dropped). */
void mr_samples_add(mr_samples *s, uint64_t ns);
/* Moves every sample of src to the end of dst; src is left empty. */
void mr_samples_merge(mr_samples *dst, mr_samples *src);
void mr_samples_free(mr_samples *s);
/* Sorts the samples; call before mr_samples_pct_us. */
void mr_samples_sort(mr_samples *s);
/* Nearest-rank percentile (q in [0,1]; 1 = max) of sorted samples, in µs; 0 if none. */
double mr_samples_pct_us(const mr_samples *s, double q);
/* Log2 bucket of a latency: bucket k > 0 counts [2^k, 2^(k+1)) µs, bucket 0 everything < 2 µs. */
unsigned mr_hist_bucket(uint64_t ns);
/* Sorts, then writes {"count","p50","p90","p99","max","histogram_log2_us":
 * [{"ge_us","count"}...]} (µs; histogram up to the last non-empty bucket;
 * "ge_us" of bucket k > 0 is 2^k, of bucket 0 is 0). */
void mr_samples_json(FILE *out, mr_samples *s);

#endif
