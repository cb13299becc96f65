/* Local restore of a validated mapped-ram snapshot into this process's
 * memory, lazily through userfaultfd (see README.md for modes and stats). */
#ifndef FASTSNAP_MR_LOCAL_H
#define FASTSNAP_MR_LOCAL_H

#include <stdint.h>
#include <stdio.h>

#include "mr_format.h"
#include "mr_json.h" /* mr_json_string, for the CLI front-end */

#define MR_FAULT_SPIN_US 20u        /* --fault-spin-us default (native/README.md: measured) */

typedef enum { MR_MODE_LAZY, MR_MODE_FAULT_ONLY, MR_MODE_EAGER, MR_MODE_SYNC } mr_mode;
typedef enum { MR_ACCESS_NONE, MR_ACCESS_SEQ, MR_ACCESS_RANDOM, MR_ACCESS_ALL } mr_access;

typedef struct mr_load_opts {
    mr_mode mode;
    mr_access access;
    unsigned threads;
    unsigned fault_threads;       /* fault-handling threads (uffd modes), 1..16 */
    unsigned fault_spin_us;       /* a fault thread polls the uffd this long after its
                                   * last event before it blocks (0: block at once) */
    int hugepages;                /* restore into 2 MiB hugetlb pages, placed whole */
    unsigned long long seed;
    int json;
    unsigned long baseline_pages; /* >0: measure a baseline after the load (--baseline N) */
} mr_load_opts;

/* Reference numbers measured in the same process as a load: the raw
 * userfaultfd round trip (uffd-bench's, with as many touching threads as the
 * load's --threads) and a sequential 1 MiB pread of the
 * same bytes the load reads (every block's page region). */
typedef struct mr_baseline {
    unsigned long pages;
    unsigned touchers;          /* faulting threads, = the load's --threads */
    double rt_p50_us, rt_p99_us;
    uint64_t read_bytes;
    double read_mib_s;
} mr_baseline;

/* 0 ok, -1 with err filled (mr_errors.h). */
int mr_load_baseline(int fd, const mr_snapshot *snap, unsigned long pages, unsigned touchers,
                     mr_baseline *out, mr_error *err);

/* Restores, prints per-block sha256 + stats to out; 0 ok, -1 with err filled
 * (exit status: mr_error_exit(err->name)). */
int mr_local_load(int fd, const mr_snapshot *snap, const mr_load_opts *opts, FILE *out,
                  mr_error *err);

/* Raw userfaultfd round trip vs sequential pread of path (mr_bench.c); 0 ok,
 * -1 with err filled (E_OPEN, E_USAGE, E_UFFD, ...). */
int mr_uffd_bench(const char *path, unsigned long pages, unsigned touchers, int json, FILE *out,
                  mr_error *err);


#endif
