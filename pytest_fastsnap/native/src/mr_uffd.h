/* userfaultfd plumbing shared by the local loader and the benchmarks:
 * open, API handshake, MISSING registration, wake; plus the clock. */
#ifndef FASTSNAP_MR_UFFD_H
#define FASTSNAP_MR_UFFD_H

#include <stddef.h>
#include <stdint.h>

#include "mr_format.h"

/* Opens a userfaultfd (/dev/userfaultfd first, then the syscall); -1 with errno. */
int mr_uffd_open(void);
/* Opens and handshakes (no features); 0 with *out set, -1 with E_UFFD in err. */
int mr_uffd_setup(int *out, mr_error *err);
/* Same, requesting `features` (UFFD_FEATURE_*); *got = what the kernel granted
 * of them (a feature it lacks is dropped, not an error: callers check). */
int mr_uffd_setup_features(int *out, uint64_t features, uint64_t *got, mr_error *err);
/* Registers [addr, addr+len) for MISSING faults (need_zeropage: also require
 * UFFDIO_ZEROPAGE, which hugetlb ranges lack); 0, or -1 with E_UFFD in err. */
int mr_uffd_register(int uffd, void *addr, uint64_t len, int need_zeropage, mr_error *err);
/* UFFDIO_WAKE of [addr, addr+len); 0 or -1 with errno. */
int mr_uffd_wake(int uffd, void *addr, uint64_t len);
/* 1 if the debug knob FASTSNAP_LOADER_INJECT (a comma-separated list) names
 * `what`, e.g. "uffd-copy-fail"; README.md lists the knobs and the tests
 * that drive them.  Read once per run by the code that owns the path. */
int mr_inject(const char *what);
/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t mr_now_ns(void);

#endif
