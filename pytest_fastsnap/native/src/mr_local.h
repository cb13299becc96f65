/* Local restore of a validated mapped-ram snapshot into this process's
 * memory, lazily through userfaultfd (see README.md for modes and stats). */
#ifndef FASTSNAP_MR_LOCAL_H
#define FASTSNAP_MR_LOCAL_H

#include <stdio.h>

#include "mr_format.h"

typedef enum { MR_MODE_LAZY, MR_MODE_FAULT_ONLY, MR_MODE_EAGER, MR_MODE_SYNC } mr_mode;
typedef enum { MR_ACCESS_NONE, MR_ACCESS_SEQ, MR_ACCESS_RANDOM, MR_ACCESS_ALL } mr_access;

typedef struct mr_load_opts {
    mr_mode mode;
    mr_access access;
    unsigned threads;
    unsigned long long seed;
    int json;
} mr_load_opts;

/* Restores, prints per-block sha256 + stats to out; 0 ok, 1 failure (message in err). */
int mr_local_load(int fd, const mr_snapshot *snap, const mr_load_opts *opts, FILE *out,
                  char *err, size_t errlen);

/* Raw userfaultfd round trip vs sequential pread of path; 0 ok, 1 failure. */
int mr_uffd_bench(const char *path, unsigned long pages, int json, FILE *out, char *err,
                  size_t errlen);

/* Opens a userfaultfd (/dev/userfaultfd first, then the syscall); -1 with errno. */
int mr_uffd_open(void);

void mr_json_string(FILE *out, const char *s);

#endif
