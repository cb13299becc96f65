/* Owns `uffd-bench` and the `load --baseline` reference numbers: the raw
 * userfaultfd round trip (N touching threads, one handler blocking in poll()
 * and answering each fault with a 4 KiB UFFDIO_COPY from memory, no file
 * I/O) and a sequential 1 MiB pread. */
#define _GNU_SOURCE
#include "mr_local.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mr_errors.h"
#include "mr_stats.h"
#include "mr_uffd.h"

#define PAGE 4096ull

typedef struct bench_ctx {
    int uffd;
    int stop_efd;               /* readable when the toucher is done */
    unsigned char *src;
    unsigned char *region;
    size_t len;
    _Atomic int error;          /* errno of a failed UFFDIO_COPY / read, 0 none */
    int inject_copy_fail;       /* debug: FASTSNAP_LOADER_INJECT=uffd-copy-fail */
} bench_ctx;

/* Answers each fault with one 4 KiB UFFDIO_COPY.  On a failure nobody will
 * resolve the fault: unregistering the region wakes the blocked toucher
 * (its retry maps a zero page), which then sees `error` and stops. */
static void *bench_handler(void *arg)
{
    bench_ctx *b = arg;
    struct uffd_msg msg;
    for (;;) {
        struct pollfd pfd[2] = {{.fd = b->uffd, .events = POLLIN},
                                {.fd = b->stop_efd, .events = POLLIN}};
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            atomic_store(&b->error, errno);
            break;
        }
        if (pfd[1].revents)
            return NULL;
        ssize_t r = read(b->uffd, &msg, sizeof msg);
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (r != (ssize_t)sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT) {
            atomic_store(&b->error, r < 0 ? errno : EPROTO);
            break;
        }
        struct uffdio_copy cp = {.dst = msg.arg.pagefault.address & ~(uint64_t)(PAGE - 1),
                                 .src = b->inject_copy_fail ? 0 : (uintptr_t)b->src, .len = PAGE};
        if (ioctl(b->uffd, UFFDIO_COPY, &cp) < 0 && errno != EEXIST) {
            atomic_store(&b->error, errno);
            break;
        }
    }
    struct uffdio_range rg = {.start = (uintptr_t)b->region, .len = b->len};
    ioctl(b->uffd, UFFDIO_UNREGISTER, &rg);
    return NULL;
}

/* One touching thread: pages idx, idx+n, idx+2n... one at a time. */
typedef struct toucher {
    bench_ctx *b;
    pthread_t th;
    unsigned idx, n;
    unsigned long pages, done;
    uint64_t sink;
    mr_samples lat;
} toucher;

static void *toucher_main(void *arg)
{
    toucher *t = arg;
    for (unsigned long i = t->idx; i < t->pages && !atomic_load(&t->b->error); i += t->n) {
        uint64_t t0 = mr_now_ns();
        t->sink += *(volatile unsigned char *)(t->b->region + i * PAGE);
        mr_samples_add(&t->lat, mr_now_ns() - t0);
        t->done++;
    }
    return NULL;
}

/* Raw userfaultfd round trip: `nt` threads fault on `pages` pages of a
 * registered anonymous region (interleaved, one at a time each), one handler
 * thread answers each with one 4 KiB UFFDIO_COPY.  lat gets the sorted round
 * trips of all touchers: the same thread count as the load it is compared to. */
static int uffd_round_trip(unsigned long pages, unsigned nt, mr_samples *lat, mr_error *err)
{
    int rc = -1, uffd = -1;
    size_t len = (size_t)pages * PAGE;
    unsigned char *region = MAP_FAILED, *src = aligned_alloc(PAGE, PAGE);
    bench_ctx b = {.uffd = -1, .stop_efd = eventfd(0, EFD_CLOEXEC),
                   .inject_copy_fail = mr_inject("uffd-copy-fail")};
    pthread_t th;
    if (!src || b.stop_efd < 0) {
        mr_error_set(err, E_INTERNAL, "%s", src ? "eventfd failed" : "out of memory");
        goto out;
    }
    memset(src, 0x5a, PAGE);
    if (mr_uffd_setup(&uffd, err) < 0)
        goto out;
    region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                  -1, 0);
    if (region == MAP_FAILED) {
        mr_error_set(err, E_INTERNAL, "mmap: %s", strerror(errno));
        goto out;
    }
    madvise(region, len, MADV_NOHUGEPAGE);
    if (mr_uffd_register(uffd, region, len, 1, err) < 0)
        goto out;
    b.uffd = uffd;
    b.src = src;
    b.region = region;
    b.len = len;
    if (pthread_create(&th, NULL, bench_handler, &b) != 0) {
        mr_error_set(err, E_INTERNAL, "pthread_create failed");
        goto out;
    }
    toucher ts[256];
    unsigned started = 0;
    if (nt < 1 || nt > sizeof ts / sizeof ts[0])
        nt = 1;
    for (unsigned k = 0; k < nt; k++) {
        ts[k] = (toucher){.b = &b, .idx = k, .n = nt, .pages = pages};
        if (pthread_create(&ts[k].th, NULL, toucher_main, &ts[k]) != 0) {
            atomic_store(&b.error, EAGAIN);
            break;
        }
        started++;
    }
    uint64_t sink = 0;
    unsigned long i = 0;
    for (unsigned k = 0; k < started; k++) {
        pthread_join(ts[k].th, NULL);
        sink += ts[k].sink;
        i += ts[k].done;
        mr_samples_merge(lat, &ts[k].lat);
    }
    uint64_t one = 1;
    if (write(b.stop_efd, &one, sizeof one) != sizeof one)
        atomic_store(&b.error, errno);
    pthread_join(th, NULL);
    int e = atomic_load(&b.error);
    if (e || sink != (uint64_t)pages * 0x5a) {
        mr_error_set(err, e ? E_UFFD : E_INTERNAL, "uffd round trip: %s after %lu of %lu pages%s",
                     e ? strerror(e) : "wrong data", i, pages,
                     e ? " (UFFDIO_COPY or read failed)" : "");
        goto out;
    }
    mr_samples_sort(lat);
    rc = 0;
out:
    if (region != MAP_FAILED)
        munmap(region, len);
    if (uffd >= 0)
        close(uffd);
    if (b.stop_efd >= 0)
        close(b.stop_efd);
    free(src);
    return rc;
}

/* Sequential 1 MiB preads of [off, off+len) (holes read as zeros); bytes/s. */
static int seq_read(int fd, uint64_t off, uint64_t len, unsigned char *buf, uint64_t *bytes,
                    uint64_t *ns)
{
    uint64_t t0 = mr_now_ns(), done = 0;
    while (done < len) {
        size_t want = len - done < (1u << 20) ? (size_t)(len - done) : (1u << 20);
        ssize_t r = mr_pread_upto(fd, buf, want, off + done);
        if (r < 0)
            return -1;
        done += (uint64_t)r;
        if ((size_t)r < want)
            break; /* end of file */
    }
    *bytes += done;
    *ns += mr_now_ns() - t0;
    return 0;
}

int mr_load_baseline(int fd, const mr_snapshot *snap, unsigned long pages, unsigned touchers,
                     mr_baseline *out, mr_error *err)
{
    memset(out, 0, sizeof *out);
    mr_samples lat = {0};
    unsigned char *buf = malloc(1u << 20);
    int rc = -1;
    if (!buf) {
        mr_error_set(err, E_INTERNAL, "out of memory");
        goto out;
    }
    if (uffd_round_trip(pages, touchers, &lat, err) < 0)
        goto out;
    out->pages = pages;
    out->touchers = touchers;
    out->rt_p50_us = mr_samples_pct_us(&lat, 0.50);
    out->rt_p99_us = mr_samples_pct_us(&lat, 0.99);
    uint64_t ns = 0;
    for (size_t i = 0; i < snap->nblocks; i++) {
        const mr_block *b = &snap->blocks[i];
        if (!b->ignored && seq_read(fd, b->pages_offset, b->used_length, buf, &out->read_bytes,
                                    &ns) < 0) {
            mr_error_set(err, E_IO, "pread: %s", strerror(errno));
            goto out;
        }
    }
    out->read_mib_s = ns ? (double)out->read_bytes / 1048576.0 / ((double)ns / 1e9) : 0.0;
    rc = 0;
out:
    mr_samples_free(&lat);
    free(buf);
    return rc;
}

int mr_uffd_bench(const char *path, unsigned long pages, unsigned touchers, int json, FILE *out,
                  mr_error *err)
{
    if (pages == 0 || pages > (1ul << 20))
        return mr_error_set(err, E_USAGE, "--pages must be 1..1048576");
    struct stat st;
    int rc = -1, fd;
    if (mr_open(path, &fd, err) < 0) {     /* E_OPEN / E_NOT_FILE */
        mr_error e = *err;  /* the path first, like the other subcommands */
        return mr_error_set(err, e.name, "%.200s: %.200s", path, e.msg);
    }
    if (fstat(fd, &st) < 0) {
        mr_error_set(err, E_IO, "fstat %s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    mr_samples lat = {0};
    unsigned char *buf = malloc(1u << 20);
    if (!buf) {
        mr_error_set(err, E_INTERNAL, "out of memory");
        goto out;
    }
    if (uffd_round_trip(pages, touchers, &lat, err) < 0)
        goto out;
    /* sequential read of the whole file (page cache as it is) */
    uint64_t total = 0, ns = 0;
    if (seq_read(fd, 0, (uint64_t)st.st_size, buf, &total, &ns) < 0) {
        mr_error_set(err, E_IO, "read %s: %s", path, strerror(errno));
        goto out;
    }
    double secs = (double)ns / 1e9;
    double mib_s = secs > 0 ? (double)total / 1048576.0 / secs : 0.0;
    if (json) {
        fprintf(out, "{\"pages\":%lu,\"touchers\":%u,\"uffd_round_trip_us\":", pages, touchers);
        mr_samples_json(out, &lat);
        fprintf(out, ",\"pread_bytes\":%" PRIu64 ",\"pread_s\":%.6f,\"pread_mib_s\":%.1f}\n",
                total, secs, mib_s);
    } else {
        fprintf(out, "uffd round trip over %lu pages: p50 %.1f us, p99 %.1f us; sequential read "
                "of %s: %" PRIu64 " bytes at %.1f MiB/s\n", pages, mr_samples_pct_us(&lat, 0.5),
                mr_samples_pct_us(&lat, 0.99), path, total, mib_s);
    }
    rc = 0;
out:
    close(fd);
    free(buf);
    mr_samples_free(&lat);
    return rc;
}
