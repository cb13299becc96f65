/* Owns `load`: local restore through userfaultfd (fault threads copying from
 * a read-only mapping of the file, an eager thread, access-driver threads;
 * pages claimed through mr_core so each is placed exactly once), the sync
 * pread mode, and the load's FASTSNAP_LOADER_INJECT failure paths.  All
 * state lives in one lctx per load.  userfaultfd set-up is mr_uffd.c,
 * uffd-bench/--baseline mr_bench.c. */
#define _GNU_SOURCE
#include "mr_local.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "mr_core.h"
#include "mr_errors.h"
#include "mr_sha256.h"
#include "mr_stats.h"
#include "mr_uffd.h"

#define PAGE 4096ull
#define RUN_PAGES 256u
#define RUN_PAGES_MIN 16u /* eager run right after a fault; doubles back to RUN_PAGES */

#define MAX_FAULT_THREADS 16u
#define HUGE_PAGE (2ull << 20)  /* --hugepages: hugetlbfs host page */

/* Per-page stage stamps of a fault resolved by a fault thread (ns): the
 * event read and the resolving ioctl's return; the toucher turns them into
 * "kernel entry -> event read" and "placed -> toucher resumes". */
typedef struct page_stamp {
    _Atomic uint64_t read, placed;
} page_stamp;

struct lctx;

/* One fault-handling thread and what only it writes (merged after join). */
typedef struct fault_worker {
    struct lctx *c;
    pthread_t th;
    uint64_t faults;
    uint64_t dedup;                 /* faults on a page another thread was placing */
    mr_samples lat;                 /* event read -> resolving ioctl returned */
    mr_samples claim, pread, copy;  /* stages: read -> claimed, pread, ioctl */
} fault_worker;

typedef struct lctx {
    int fd;
    int uffd;
    const mr_snapshot *snap;
    const mr_load_opts *opts;
    mr_core_block *blocks;
    size_t nblocks;
    uint64_t total_pages;
    uint64_t unit;                  /* pages placed as one host page: 1, or 512 (2 MiB) */
    _Atomic int pending_faults;
    _Atomic int stop;
    const unsigned char *fmap;      /* the file mapped read-only (4 KiB units), or NULL */
    uint64_t fmap_len;
    int stop_efd;                   /* readable once stop is set: wakes the fault thread */
    _Atomic int failed;
    mr_error err;                   /* first failure: E_* name and message */
    /* threads and timestamps of the restore */
    fault_worker fw[MAX_FAULT_THREADS];
    unsigned nfw;                   /* fault threads started */
    page_stamp **stamps;            /* per block, per page (uffd modes) */
    pthread_t et;
    int et_started;
    uint64_t t0, t_ready, t_complete;
    /* stats */
    _Atomic uint64_t bytes_read, pages_copied, pages_zero, double_loads, pages_loaded;
    _Atomic uint64_t eager_pages, eager_ns, wakes;
    _Atomic uint64_t fault_seq;     /* fault events read so far (eager backs off) */
    /* fault threads' results, merged after they are joined */
    uint64_t faults;
    uint64_t dedup;
    mr_samples fault_lat, st_claim, st_pread, st_copy;
    /* access threads' stages: kernel entry -> event read, placed -> resumed */
    mr_samples st_event, st_resume;
    /* access threads' cold touches, merged after they are joined */
    mr_samples touch_lat;
    /* debug knobs (FASTSNAP_LOADER_INJECT, read once at start; README.md) */
    struct {
        int fault_abandon;   /* a fault thread leaves its first events pending and fails */
        int dup_events;      /* every pagefault event is handled twice (as when two
                              * threads fault on one page): the second one wakes */
        int place_twice;     /* a fault thread places each page again: EEXIST -> wake */
        int wake_fail;       /* UFFDIO_WAKE gets an empty range: the kernel says EINVAL */
        int no_fmap;         /* pread-fault: the fault path preads instead of copying
                              * from the file mapping (A/B measurement) */
        int event_remove;    /* request UFFD_FEATURE_EVENT_REMOVE and MADV_DONTNEED a
                              * placed page: a non-pagefault event reaches the fault thread */
    } inj;
} lctx;

typedef struct access_arg {
    lctx *c;
    unsigned index;
    mr_access pattern;
    const uint64_t *order;   /* random: global page numbers */
    uint64_t order_n;
    uint64_t sink;
    int record;              /* time cold touches (not in the completion pass) */
    mr_samples lat;          /* this thread's cold-touch latencies */
    mr_samples st_event, st_resume;
} access_arg;

/* Bytes mapped for a block: used_length rounded up to the host page. */
static uint64_t map_len(const lctx *c, const mr_core_block *b)
{
    uint64_t host = c->unit * PAGE;
    return (b->meta->used_length + host - 1) / host * host;
}

/* Stops every thread: the flag for the loops, the eventfd for the fault
 * thread blocked in poll(). */
static void request_stop(lctx *c)
{
    atomic_store(&c->stop, 1);
    uint64_t one = 1;
    if (c->stop_efd >= 0 && write(c->stop_efd, &one, sizeof one) < 0) {
        /* only EAGAIN (counter saturated) is possible: already readable */
    }
}

/* Records the first failure (any thread) and stops everything. */
__attribute__((format(printf, 3, 4)))
static void set_fail(lctx *c, const char *name, const char *fmt, ...)
{
    int expected = 0;
    if (atomic_compare_exchange_strong(&c->failed, &expected, 1)) {
        va_list ap;
        va_start(ap, fmt);
        mr_error_vset(&c->err, name, fmt, ap);
        va_end(ap);
    }
    request_stop(c);
}

/* UFFDIO_WAKE of [addr, addr+len); 0 or -1 with errno. */
static int wake(lctx *c, void *addr, uint64_t len)
{
    int rc = mr_uffd_wake(c->uffd, addr, c->inj.wake_fail ? 0 : len);
    if (rc == 0)
        atomic_fetch_add(&c->wakes, 1);
    return rc;
}

/* Exactly n bytes at off: a validated file covers every region, so a short
 * read means the file shrank (EIO). */
static int pread_full(int fd, void *buf, size_t n, uint64_t off)
{
    ssize_t r = mr_pread_upto(fd, buf, n, off);
    if (r >= 0 && (size_t)r < n)
        errno = EIO;
    return r >= 0 && (size_t)r == n ? 0 : -1;
}

/* Places npages at dst (data from src, or zero pages if src is NULL), handling
 * partial progress.  Pages already present (EEXIST) are woken and skipped.
 * Returns 0 or -1 (errno). */
static int place(lctx *c, unsigned char *dst, const unsigned char *src, uint64_t npages)
{
    uint64_t len = npages * PAGE, done = 0;
    int tries = 0;
    while (done < len) {
        int64_t progress;
        int rc, e;
        if (src) {
            struct uffdio_copy cp = {.dst = (uintptr_t)(dst + done),
                                     .src = (uintptr_t)(src + done), .len = len - done};
            rc = ioctl(c->uffd, UFFDIO_COPY, &cp);
            e = errno;
            progress = cp.copy;
        } else {
            struct uffdio_zeropage zp = {.range = {.start = (uintptr_t)(dst + done),
                                                   .len = len - done}};
            rc = ioctl(c->uffd, UFFDIO_ZEROPAGE, &zp);
            e = errno;
            progress = zp.zeropage;
        }
        if (rc == 0) {
            done = len;
            break;
        }
        if (progress > 0) {
            done += (uint64_t)progress;
            continue;
        }
        if (e == EEXIST) {
            /* The next host page is already present: wake its waiters and move on. */
            if (wake(c, dst + done, c->unit * PAGE) < 0)
                return -1;
            done += c->unit * PAGE;
            continue;
        }
        if (e == EAGAIN && ++tries < 100000) {
            sched_yield();
            continue;
        }
        errno = e;
        return -1;
    }
    return 0;
}

static mr_core_block *find_block(lctx *c, uintptr_t addr, uint64_t *page, size_t *index)
{
    for (size_t i = 0; i < c->nblocks; i++) {
        mr_core_block *b = &c->blocks[i];
        if (!b->mem)
            continue;
        uintptr_t base = (uintptr_t)b->mem;
        if (addr >= base && addr < base + map_len(c, b)) {
            *page = (addr - base) / PAGE;
            *index = i;
            return b;
        }
    }
    return NULL;
}

static void account(lctx *c, mr_core_block *b, uint64_t first, uint64_t n, int data)
{
    for (uint64_t p = first; p < first + n; p++) {
        if (mr_core_mark_loaded(b, p))
            atomic_fetch_add(&c->double_loads, 1);
        else
            atomic_fetch_add(&c->pages_loaded, 1);
    }
    atomic_fetch_add(data ? &c->pages_copied : &c->pages_zero, n);
}

/* --hugepages: fills buf with the host page starting at `first` (data pages
 * read in runs, clear-bit pages and pages past the block zeroed) and places
 * it with one UFFDIO_COPY; the caller owns the claim on `first`, which
 * stands for the whole host page: the other pages' claims are set here. */
static int load_unit(lctx *c, mr_core_block *b, uint64_t first, unsigned char *buf)
{
    for (uint64_t p = first + 1; p < first + c->unit && p < b->num_pages; p++)
        mr_core_claim(b, p);
    uint64_t p = first, end = first + c->unit;
    while (p < end) {
        if (p >= b->num_pages) {
            memset(buf + (p - first) * PAGE, 0, (size_t)((end - p) * PAGE));
            break;
        }
        int bit = mr_core_bit(b, p);
        uint64_t run = 1;
        while (p + run < end && p + run < b->num_pages && mr_core_bit(b, p + run) == bit)
            run++;
        unsigned char *dst = buf + (p - first) * PAGE;
        if (bit) {
            if (pread_full(c->fd, dst, (size_t)(run * PAGE), b->meta->pages_offset + p * PAGE) < 0)
                return -1;
            atomic_fetch_add(&c->bytes_read, run * PAGE);
        } else {
            memset(dst, 0, (size_t)(run * PAGE));
        }
        p += run;
    }
    if (place(c, b->mem + first * PAGE, buf, c->unit) < 0)
        return -1;
    for (uint64_t q = first; q < end && q < b->num_pages;) {
        int bit = mr_core_bit(b, q);
        uint64_t run = 1;
        while (q + run < end && q + run < b->num_pages && mr_core_bit(b, q + run) == bit)
            run++;
        account(c, b, q, run, bit);
        q += run;
    }
    return 0;
}

/* Places one claimed page; *t_read_done = when its data was in buf. */
static int load_one(lctx *c, mr_core_block *b, uint64_t page, unsigned char *buf,
                    uint64_t *t_read_done)
{
    unsigned char *dst = b->mem + page * PAGE;
    *t_read_done = mr_now_ns();
    if (c->unit > 1) {
        int rc = load_unit(c, b, page, buf);
        *t_read_done = mr_now_ns();
        return rc;
    }
    if (mr_core_bit(b, page)) {
        /* From the file mapping the kernel copies straight out of the page
         * cache: no pread (~1.3 us of the fault path here, native/README.md). */
        const unsigned char *src = buf;
        if (c->fmap)
            src = c->fmap + b->meta->pages_offset + page * PAGE;
        else if (pread_full(c->fd, buf, PAGE, b->meta->pages_offset + page * PAGE) < 0)
            return -1;
        *t_read_done = mr_now_ns();
        atomic_fetch_add(&c->bytes_read, PAGE);
        if (place(c, dst, src, 1) < 0)
            return -1;
        account(c, b, page, 1, 1);
    } else {
        if (place(c, dst, NULL, 1) < 0)
            return -1;
        account(c, b, page, 1, 0);
    }
    return 0;
}

/* Handles one event a fault thread read (counted in pending_faults by the
 * reader; uncounted here).  Only UFFD_EVENT_PAGEFAULT is expected: no other
 * event was requested, so anything else is a kernel contract this loader
 * does not understand and fails the load rather than being skipped. */
static void handle_event(fault_worker *w, const struct uffd_msg *m, unsigned char *buf)
{
    lctx *c = w->c;
    uint64_t t0 = mr_now_ns();
    if (m->event != UFFD_EVENT_PAGEFAULT) {
        set_fail(c, E_INTERNAL, "fault thread: unexpected userfaultfd event %#x", m->event);
        atomic_fetch_sub(&c->pending_faults, 1);
        return;
    }
    uintptr_t addr = (uintptr_t)m->arg.pagefault.address & ~(uintptr_t)(PAGE - 1);
    uint64_t page;
    size_t bi;
    mr_core_block *b = find_block(c, addr, &page, &bi);
    w->faults++;
    if (b && c->unit > 1) {     /* the host page's first page stands for it */
        page -= page % c->unit;
        addr = (uintptr_t)(b->mem + page * PAGE);
    }
    if (!b) {
        set_fail(c, E_INTERNAL, "fault at %#" PRIxPTR " outside every block", addr);
    } else if (mr_core_claim(b, page)) {
        uint64_t t_claimed = mr_now_ns(), t_data;
        if (load_one(c, b, page, buf, &t_data) < 0) {
            set_fail(c, E_UFFD, "fault thread: block %s page %" PRIu64 ": %s",
                     b->meta->id, page, strerror(errno));
        } else {
            uint64_t t_placed = mr_now_ns();
            mr_samples_add(&w->claim, t_claimed - t0);
            mr_samples_add(&w->pread, t_data - t_claimed);
            mr_samples_add(&w->copy, t_placed - t_data);
            atomic_store_explicit(&c->stamps[bi][page].read, t0, memory_order_relaxed);
            atomic_store_explicit(&c->stamps[bi][page].placed, t_placed, memory_order_release);
            if (c->inj.place_twice && c->unit == 1 && place(c, (void *)addr, NULL, 1) < 0)
                set_fail(c, E_UFFD, "fault thread: block %s page %" PRIu64
                         ": placing it again (injected): %s", b->meta->id, page, strerror(errno));
        }
    } else if (atomic_load(&b->loads[page])) {
        /* Placed already (its copy woke the faulter; a wake is cheap and
         * covers any path that placed without waking). */
        if (wake(c, (void *)addr, c->unit * PAGE) < 0)
            set_fail(c, E_UFFD, "fault thread: UFFDIO_WAKE block %s page %" PRIu64 ": %s",
                     b->meta->id, page, strerror(errno));
    } else {
        /* Claimed by another thread, not placed yet: its waking
         * UFFDIO_COPY/ZEROPAGE will wake the faulter.  Waking now
         * would only make it fault again and spin until then. */
        w->dedup++;
        atomic_fetch_sub(&c->pending_faults, 1);
        return;
    }
    mr_samples_add(&w->lat, mr_now_ns() - t0);
    atomic_fetch_sub(&c->pending_faults, 1);
}

/* Nobody will resolve faults any more: unregister so waiters wake (they
 * read zeros; the load reports failure and prints no digest). */
static void unregister_all(lctx *c)
{
    for (size_t i = 0; i < c->nblocks; i++)
        if (c->blocks[i].mem) {
            struct uffdio_range r = {.start = (uintptr_t)c->blocks[i].mem,
                                     .len = map_len(c, &c->blocks[i])};
            ioctl(c->uffd, UFFDIO_UNREGISTER, &r);
        }
}

static void *fault_thread(void *arg)
{
    fault_worker *w = arg;
    lctx *c = w->c;
    unsigned char *buf = aligned_alloc(PAGE, (size_t)(c->unit * PAGE));
    struct uffd_msg msgs[64];
    if (!buf) {
        set_fail(c, E_INTERNAL, "fault thread: out of memory");
        return NULL;
    }
    uint64_t spin_ns = (uint64_t)c->opts->fault_spin_us * 1000, last_event = 0;
    while (!atomic_load(&c->stop)) {
        /* Right after an event the next one tends to follow within a few µs
         * (the toucher resumes and faults again): read the non-blocking uffd
         * for up to spin_ns, yielding between reads so a toucher woken on
         * this CPU is not kept waiting, which saves the fault thread's
         * wake-up.  Then block until a fault or a stop request (stop_efd). */
        ssize_t r;
        if (spin_ns && mr_now_ns() - last_event < spin_ns) {
            r = read(c->uffd, msgs, sizeof msgs);
            if (r < 0 && errno == EAGAIN)
                sched_yield();
        } else {
            struct pollfd pfd[2] = {{.fd = c->uffd, .events = POLLIN},
                                    {.fd = c->stop_efd, .events = POLLIN}};
            int pr = poll(pfd, 2, -1);
            if (pr < 0 && errno != EINTR) {
                set_fail(c, E_UFFD, "fault thread: poll: %s", strerror(errno));
                break;
            }
            if (pr <= 0 || !(pfd[0].revents & POLLIN))
                continue;
            r = read(c->uffd, msgs, sizeof msgs);
        }
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            set_fail(c, E_UFFD, "fault thread: read: %s", strerror(errno));
            break;
        }
        last_event = mr_now_ns();
        size_t n = (size_t)r / sizeof msgs[0];
        atomic_fetch_add(&c->pending_faults, (int)n);
        atomic_fetch_add(&c->fault_seq, n);
        if (c->inj.fault_abandon) {
            /* A fault thread that dies holding counted events: the eager
             * thread waits for them ("faults go first") and must still
             * see the stop request. */
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
            set_fail(c, E_INTERNAL, "fault thread: abandoned %zu events (injected)", n);
            break;
        }
        for (size_t i = 0; i < n; i++) {
            handle_event(w, &msgs[i], buf);
            if (c->inj.dup_events && msgs[i].event == UFFD_EVENT_PAGEFAULT) {
                atomic_fetch_add(&c->pending_faults, 1);
                handle_event(w, &msgs[i], buf);
            }
        }
        if (atomic_load(&c->failed))
            break;
    }
    if (atomic_load(&c->failed))
        unregister_all(c);
    free(buf);
    return NULL;
}

/* --hugepages eager pass: whole host pages, in order, faults first. */
static uint64_t eager_huge(lctx *c, unsigned char *buf)
{
    uint64_t placed = 0;
    for (size_t bi = 0; bi < c->nblocks && !atomic_load(&c->stop); bi++) {
        mr_core_block *b = &c->blocks[bi];
        if (!b->mem)
            continue;
        for (uint64_t u = 0; u < b->num_pages && !atomic_load(&c->stop); u += c->unit) {
            while (atomic_load_explicit(&c->pending_faults, memory_order_relaxed) > 0 &&
                   !atomic_load_explicit(&c->stop, memory_order_relaxed))
                sched_yield(); /* faults go first */
            if (!mr_core_claim(b, u))
                continue;
            if (load_unit(c, b, u, buf) < 0) {
                set_fail(c, E_IO, "eager thread: block %s host page at page %" PRIu64 ": %s",
                         b->meta->id, u, strerror(errno));
                break;
            }
            placed += c->unit < b->num_pages - u ? c->unit : b->num_pages - u;
        }
    }
    return placed;
}

static void *eager_thread(void *arg)
{
    lctx *c = arg;
    if (c->unit > 1) {
        unsigned char *hbuf = aligned_alloc(PAGE, (size_t)(c->unit * PAGE));
        if (!hbuf) {
            set_fail(c, E_INTERNAL, "eager thread: out of memory");
            return NULL;
        }
        uint64_t t0 = mr_now_ns();
        atomic_store(&c->eager_pages, eager_huge(c, hbuf));
        atomic_store(&c->eager_ns, mr_now_ns() - t0);
        free(hbuf);
        return NULL;
    }
    unsigned char *buf = aligned_alloc(PAGE, RUN_PAGES * PAGE);
    if (!buf) {
        set_fail(c, E_INTERNAL, "eager thread: out of memory");
        return NULL;
    }
    uint64_t t0 = mr_now_ns(), placed = 0;
    uint64_t seen = atomic_load(&c->fault_seq);
    unsigned cap = RUN_PAGES;
    for (size_t bi = 0; bi < c->nblocks && !atomic_load(&c->stop); bi++) {
        mr_core_block *b = &c->blocks[bi];
        if (!b->mem)
            continue;
        uint64_t page = 0;
        while (page < b->num_pages && !atomic_load(&c->stop)) {
            while (atomic_load_explicit(&c->pending_faults, memory_order_relaxed) > 0 &&
                   !atomic_load_explicit(&c->stop, memory_order_relaxed))
                sched_yield(); /* faults go first */
            /* Runs claimed in one go make faults on them wait for the whole
             * pread + copy: short runs while faults keep coming, doubling
             * back to RUN_PAGES when they stop. */
            uint64_t fs = atomic_load_explicit(&c->fault_seq, memory_order_relaxed);
            if (fs != seen) {
                seen = fs;
                cap = RUN_PAGES_MIN;
            } else if (cap < RUN_PAGES) {
                cap *= 2;
            }
            if (page % 64 == 0 && page + 64 <= b->num_pages &&
                mr_core_claimed_word(b, page) == UINT64_MAX) {
                page += 64;
                continue;
            }
            if (!mr_core_claim(b, page)) {
                page++;
                continue;
            }
            int bit = mr_core_bit(b, page);
            uint64_t run = 1;
            while (run < cap && page + run < b->num_pages &&
                   mr_core_bit(b, page + run) == bit && !mr_core_is_claimed(b, page + run) &&
                   mr_core_claim(b, page + run))
                run++;
            unsigned char *dst = b->mem + page * PAGE;
            if (bit) {
                if (pread_full(c->fd, buf, (size_t)(run * PAGE),
                               b->meta->pages_offset + page * PAGE) < 0) {
                    set_fail(c, E_IO, "eager thread: block %s pages %" PRIu64 "+%" PRIu64
                             ": pread: %s",
                             b->meta->id, page, run, strerror(errno));
                    break;
                }
                atomic_fetch_add(&c->bytes_read, run * PAGE);
            }
            if (place(c, dst, bit ? buf : NULL, run) < 0) {
                set_fail(c, E_UFFD, "eager thread: block %s pages %" PRIu64 "+%" PRIu64 ": %s: %s",
                         b->meta->id, page, run, bit ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE",
                         strerror(errno));
                break;
            }
            account(c, b, page, run, bit);
            placed += run;
            page += run;
        }
    }
    atomic_store(&c->eager_pages, placed);
    atomic_store(&c->eager_ns, mr_now_ns() - t0);
    free(buf);
    return NULL;
}

/* sync mode: pread straight into the (unregistered) block memory. */
static int sync_load(lctx *c)
{
    for (size_t bi = 0; bi < c->nblocks; bi++) {
        mr_core_block *b = &c->blocks[bi];
        if (!b->mem)
            continue;
        uint64_t page = 0;
        while (page < b->num_pages) {
            int bit = mr_core_bit(b, page);
            uint64_t run = 1;
            while (run < RUN_PAGES && page + run < b->num_pages && mr_core_bit(b, page + run) == bit)
                run++;
            for (uint64_t p = page; p < page + run; p++)
                mr_core_claim(b, p);
            if (bit) {
                if (pread_full(c->fd, b->mem + page * PAGE, (size_t)(run * PAGE),
                               b->meta->pages_offset + page * PAGE) < 0) {
                    set_fail(c, E_IO, "sync: block %s pages %" PRIu64 "+%" PRIu64 ": pread: %s",
                             b->meta->id, page, run, strerror(errno));
                    return -1;
                }
                atomic_fetch_add(&c->bytes_read, run * PAGE);
            }
            account(c, b, page, run, bit);
            page += run;
        }
    }
    return 0;
}

/* global page g -> block and page */
static mr_core_block *global_page(lctx *c, uint64_t g, uint64_t *page, size_t *index)
{
    for (size_t i = 0; i < c->nblocks; i++) {
        mr_core_block *b = &c->blocks[i];
        if (!b->mem)
            continue;
        if (g < b->num_pages) {
            *page = g;
            *index = i;
            return b;
        }
        g -= b->num_pages;
    }
    return NULL;
}

/* Reads one byte of page p.  A page nobody has claimed yet will fault: that
 * touch is timed (the application's view of a fault: kernel entry, handler,
 * copy, wake-up and return). */
static uint64_t touch(access_arg *a, size_t bi, mr_core_block *b, uint64_t p)
{
    int cold = a->record && !mr_core_is_claimed(b, p);
    uint64_t t = cold ? mr_now_ns() : 0;
    uint64_t v = *(volatile unsigned char *)(b->mem + p * PAGE);
    if (cold) {
        uint64_t t1 = mr_now_ns();
        mr_samples_add(&a->lat, t1 - t);
        const page_stamp *st = a->c->stamps ? &a->c->stamps[bi][p] : NULL;
        uint64_t placed = st ? atomic_load_explicit(&st->placed, memory_order_acquire) : 0;
        uint64_t read = st ? atomic_load_explicit(&st->read, memory_order_relaxed) : 0;
        if (placed && read >= t && placed <= t1) {  /* our fault, resolved by a fault thread */
            mr_samples_add(&a->st_event, read - t);
            mr_samples_add(&a->st_resume, t1 - placed);
        }
    }
    return v;
}

static void *access_thread(void *arg)
{
    access_arg *a = arg;
    lctx *c = a->c;
    unsigned n = c->opts->threads;
    uint64_t sink = 0;
    if (a->pattern == MR_ACCESS_RANDOM) {
        for (uint64_t i = a->index; i < a->order_n && !atomic_load(&c->stop); i += n) {
            uint64_t page;
            size_t bi;
            mr_core_block *b = global_page(c, a->order[i], &page, &bi);
            if (b)
                sink += touch(a, bi, b, page);
        }
    } else {
        /* all: every page; seq: the first quarter of each block (a boot-like
         * working set); each thread walks its own contiguous slice. */
        for (size_t bi = 0; bi < c->nblocks && !atomic_load(&c->stop); bi++) {
            mr_core_block *b = &c->blocks[bi];
            if (!b->mem)
                continue;
            uint64_t pages = a->pattern == MR_ACCESS_SEQ ? (b->num_pages + 3) / 4 : b->num_pages;
            uint64_t per = (pages + n - 1) / n;
            uint64_t lo = per * a->index, hi = lo + per < pages ? lo + per : pages;
            for (uint64_t p = lo; p < hi && !atomic_load(&c->stop); p++)
                sink += touch(a, bi, b, p);
        }
    }
    a->sink = sink;
    return NULL;
}

static int run_access(lctx *c, mr_access pattern, unsigned long long seed, int record)
{
    if (pattern == MR_ACCESS_NONE)
        return 0;
    unsigned n = c->opts->threads;
    uint64_t *order = NULL, order_n = 0;
    if (pattern == MR_ACCESS_RANDOM) {
        order = malloc((size_t)(c->total_pages ? c->total_pages : 1) * sizeof *order);
        if (!order)
            return set_fail(c, E_INTERNAL, "out of memory"), -1;
        for (uint64_t i = 0; i < c->total_pages; i++)
            order[i] = i;
        uint64_t x = seed ? seed : 0x9e3779b97f4a7c15ull;
        for (uint64_t i = c->total_pages; i > 1; i--) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            uint64_t j = x % i, t = order[i - 1];
            order[i - 1] = order[j];
            order[j] = t;
        }
        order_n = (c->total_pages + 1) / 2; /* a random half, in random order */
    }
    pthread_t *tids = calloc(n, sizeof *tids);
    access_arg *args = calloc(n, sizeof *args);
    if (!tids || !args) {
        free(tids); free(args); free(order);
        return set_fail(c, E_INTERNAL, "out of memory"), -1;
    }
    unsigned started = 0;
    for (unsigned i = 0; i < n; i++) {
        args[i] = (access_arg){.c = c, .index = i, .pattern = pattern, .order = order,
                               .order_n = order_n, .record = record};
        if (pthread_create(&tids[i], NULL, access_thread, &args[i]) != 0) {
            set_fail(c, E_INTERNAL, "pthread_create: access thread failed");
            break;
        }
        started++;
    }
    for (unsigned i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    for (unsigned i = 0; i < started; i++) {
        mr_samples_merge(&c->touch_lat, &args[i].lat);
        mr_samples_merge(&c->st_event, &args[i].st_event);
        mr_samples_merge(&c->st_resume, &args[i].st_resume);
    }
    free(tids); free(args); free(order);
    return atomic_load(&c->failed) ? -1 : 0;
}

static const char *mode_name(mr_mode m)
{
    static const char *names[] = {"lazy", "fault-only", "eager", "sync"};
    return names[m];
}

static const char *access_name(mr_access a)
{
    static const char *names[] = {"none", "seq", "random", "all"};
    return names[a];
}

/* Page-size check, bitmaps, userfaultfd, block memory (registered unless sync). */
static int setup_memory(lctx *c)
{
    if ((uint64_t)sysconf(_SC_PAGESIZE) != PAGE || c->snap->page_size != PAGE)
        return mr_error_set(&c->err, E_UNSUPPORTED, "host or target page size is not 4096");
    c->blocks = calloc(c->nblocks ? c->nblocks : 1, sizeof *c->blocks);
    if (!c->blocks)
        return mr_error_set(&c->err, E_INTERNAL, "out of memory");
    if (mr_core_init(c->fd, c->snap, c->blocks) < 0)
        return mr_error_set(&c->err, E_IO, "loading bitmaps: %s", strerror(errno));
    int use_uffd = c->opts->mode != MR_MODE_SYNC;
    if (use_uffd && c->unit == 1 && c->snap->file_size && !c->inj.no_fmap) {
        /* The fault path's data source (validated offsets only).  A file
         * that shrinks later makes that UFFDIO_COPY fail (EFAULT), never a
         * signal: the kernel reads the mapping.  Without a mapping: pread. */
        void *m = mmap(NULL, (size_t)c->snap->file_size, PROT_READ, MAP_SHARED, c->fd, 0);
        if (m != MAP_FAILED) {
            c->fmap = m;
            c->fmap_len = c->snap->file_size;
        }
    }
    uint64_t features = c->inj.event_remove ? UFFD_FEATURE_EVENT_REMOVE : 0, got = 0;
    if (use_uffd && mr_uffd_setup_features(&c->uffd, features, &got, &c->err) < 0)
        return -1;
    if (use_uffd && got != features)
        return mr_error_set(&c->err, E_UFFD, "userfaultfd features %#" PRIx64 " not offered",
                            features & ~got);
    if (use_uffd) {
        c->stamps = calloc(c->nblocks ? c->nblocks : 1, sizeof *c->stamps);
        for (size_t i = 0; c->stamps && i < c->nblocks; i++)
            if (!(c->stamps[i] = calloc(c->blocks[i].num_pages ? c->blocks[i].num_pages : 1,
                                        sizeof **c->stamps)))
                return mr_error_set(&c->err, E_INTERNAL, "out of memory (page stamps)");
        if (!c->stamps)
            return mr_error_set(&c->err, E_INTERNAL, "out of memory (page stamps)");
    }
    for (size_t i = 0; i < c->nblocks; i++) {
        mr_core_block *b = &c->blocks[i];
        if (b->meta->ignored)
            continue;
        /* hugetlb: reserved at mmap time (no MAP_NORESERVE), so an empty
         * pool is a clean ENOMEM here rather than a SIGBUS on a fault. */
        int flags = MAP_PRIVATE | MAP_ANONYMOUS |
                    (c->unit > 1 ? MAP_HUGETLB | (21 << MAP_HUGE_SHIFT) : MAP_NORESERVE);
        void *m = mmap(NULL, (size_t)map_len(c, b), PROT_READ | PROT_WRITE, flags, -1, 0);
        if (m == MAP_FAILED)
            return mr_error_set(&c->err, c->unit > 1 ? E_UNSUPPORTED : E_INTERNAL,
                                "mmap %" PRIu64 " bytes%s for block %s: %s", map_len(c, b),
                                c->unit > 1 ? " of 2 MiB huge pages (see "
                                "/proc/sys/vm/nr_hugepages)" : "", b->meta->id, strerror(errno));
        b->mem = m;
        c->total_pages += b->num_pages;
        if (use_uffd) {
            if (c->unit == 1)
                madvise(m, (size_t)b->meta->used_length, MADV_NOHUGEPAGE);
            if (mr_uffd_register(c->uffd, m, map_len(c, b), c->unit == 1, &c->err) < 0)
                return -1;
        }
    }
    return 0;
}

/* Fault thread, and the eager thread unless fault-only (eager: waited for). */
static int start_threads(lctx *c)
{
    for (unsigned i = 0; i < c->opts->fault_threads; i++) {
        c->fw[i].c = c;
        if (pthread_create(&c->fw[i].th, NULL, fault_thread, &c->fw[i]) != 0)
            return mr_error_set(&c->err, E_INTERNAL, "pthread_create (fault thread) failed");
        c->nfw = i + 1;
    }
    if (c->opts->mode == MR_MODE_FAULT_ONLY)
        return 0;
    if (pthread_create(&c->et, NULL, eager_thread, c) != 0)
        return mr_error_set(&c->err, E_INTERNAL, "pthread_create (eager thread) failed");
    c->et_started = 1;
    if (c->opts->mode == MR_MODE_EAGER) {
        pthread_join(c->et, NULL);
        c->et_started = 0;
    }
    return 0;
}

/* FASTSNAP_LOADER_INJECT=event-remove: faults in the first page of the first
 * block, then drops it with MADV_DONTNEED; with UFFD_FEATURE_EVENT_REMOVE
 * the kernel reports that as UFFD_EVENT_REMOVE (madvise waits until a fault
 * thread has read it), an event the fault threads do not handle. */
static void inject_remove_event(lctx *c)
{
    for (size_t i = 0; i < c->nblocks; i++)
        if (c->blocks[i].mem) {
            volatile unsigned char *m = c->blocks[i].mem;
            (void)m[0];
            madvise(c->blocks[i].mem, (size_t)(c->unit * PAGE), MADV_DONTNEED);
            return;
        }
}

/* Ready (threads up or sync load done), access, every page loaded. */
static int restore(lctx *c)
{
    c->t0 = mr_now_ns();
    if (c->opts->mode == MR_MODE_SYNC ? sync_load(c) < 0 : start_threads(c) < 0)
        return -1;
    c->t_ready = mr_now_ns();
    if (c->inj.event_remove && c->opts->mode != MR_MODE_SYNC)
        inject_remove_event(c);
    if (run_access(c, c->opts->access, c->opts->seed, 1) < 0)
        return -1;
    if (c->et_started) {
        pthread_join(c->et, NULL);
        c->et_started = 0;
    }
    /* fault-only: nothing loads untouched pages, so a completion pass (`all`)
     * drives every remaining page in before the digest. */
    if (c->opts->mode == MR_MODE_FAULT_ONLY && run_access(c, MR_ACCESS_ALL, 0, 0) < 0)
        return -1;
    c->t_complete = mr_now_ns();
    return atomic_load(&c->failed) ? -1 : 0;
}

static void digest_blocks(lctx *c, char digests[][65])
{
    for (size_t i = 0; i < c->nblocks; i++) {
        mr_core_block *b = &c->blocks[i];
        mr_sha256 h;
        unsigned char dig[32];
        mr_sha256_init(&h);
        if (b->mem)
            mr_sha256_update(&h, b->mem, (size_t)b->meta->used_length);
        mr_sha256_final(&h, dig);
        mr_sha256_hex(dig, digests[i]);
    }
}

static double eager_mib_s(lctx *c)
{
    uint64_t ns = atomic_load(&c->eager_pages) ? atomic_load(&c->eager_ns) : 0;
    return ns ? (double)atomic_load(&c->eager_pages) * PAGE / 1048576.0 / ((double)ns / 1e9)
              : 0.0;
}

static void report_json(lctx *c, FILE *out, char digests[][65], const mr_baseline *base)
{
    const mr_snapshot *snap = c->snap;
    const mr_load_opts *opts = c->opts;
    fprintf(out, "{\"mode\":\"%s\",\"access\":\"%s\",\"threads\":%u,\"blocks\":[",
            mode_name(opts->mode), access_name(opts->access), opts->threads);
    for (size_t i = 0; i < c->nblocks; i++) {
        fprintf(out, "%s{\"id\":", i ? "," : "");
        mr_json_string(out, snap->blocks[i].id);
        fprintf(out, ",\"length\":%" PRIu64 ",\"sha256\":\"%s\"}", snap->blocks[i].used_length,
                digests[i]);
    }
    fprintf(out, "],\"stats\":{\"faults\":%" PRIu64 ",\"fault_latency_us\":", c->faults);
    mr_samples_json(out, &c->fault_lat);
    fputs(",\"touch_latency_us\":", out);
    mr_samples_json(out, &c->touch_lat);
    fprintf(out, ",\"fault_threads\":%u,\"fault_spin_us\":%u,\"fault_source\":\"%s\","
            "\"fault_stages_us\":{\"event_read\":", c->opts->fault_threads,
            c->opts->fault_spin_us, c->fmap ? "mmap" : "pread");
    mr_samples_json(out, &c->st_event);
    fputs(",\"claim\":", out);
    mr_samples_json(out, &c->st_claim);
    fputs(",\"pread\":", out);
    mr_samples_json(out, &c->st_pread);
    fputs(",\"copy\":", out);
    mr_samples_json(out, &c->st_copy);
    fputs(",\"resume\":", out);
    mr_samples_json(out, &c->st_resume);
    fprintf(out, "},\"fault_dedup\":%" PRIu64 ",", c->dedup);
    fprintf(out, "\"time_to_ready_s\":%.6f,\"time_to_complete_s\":%.6f,"
            "\"bytes_read\":%" PRIu64 ",\"pages_copied\":%" PRIu64 ",\"pages_zero\":%" PRIu64
            ",\"eager_pages\":%" PRIu64 ",\"eager_mib_s\":%.1f,\"wakes\":%" PRIu64
            ",\"double_loads\":%" PRIu64 ",\"pages_loaded\":%" PRIu64 ",\"total_pages\":%"
            PRIu64 "}", (double)(c->t_ready - c->t0) / 1e9, (double)(c->t_complete - c->t0) / 1e9,
            atomic_load(&c->bytes_read), atomic_load(&c->pages_copied),
            atomic_load(&c->pages_zero), atomic_load(&c->eager_pages), eager_mib_s(c),
            atomic_load(&c->wakes), atomic_load(&c->double_loads), atomic_load(&c->pages_loaded),
            c->total_pages);
    if (base)
        fprintf(out, ",\"baseline\":{\"uffd_round_trip_us\":{\"pages\":%lu,\"touchers\":%u,"
                "\"p50\":%.3f,\"p99\":%.3f},\"pread_bytes\":%" PRIu64 ",\"pread_mib_s\":%.1f}",
                base->pages, base->touchers, base->rt_p50_us, base->rt_p99_us, base->read_bytes,
                base->read_mib_s);
    fprintf(out, "}\n");
}

static void report_text(lctx *c, FILE *out, char digests[][65])
{
    const mr_snapshot *snap = c->snap;
    const mr_load_opts *opts = c->opts;
    for (size_t i = 0; i < c->nblocks; i++)
        fprintf(out, "%s  %s  %" PRIu64 "\n", digests[i], snap->blocks[i].id,
                snap->blocks[i].used_length);
    fprintf(out, "mode %s access %s threads %u: ready %.3f s, complete %.3f s, faults %" PRIu64
            " (p50 %.1f us, p99 %.1f us), read %" PRIu64 " bytes, copied %" PRIu64
            " zero %" PRIu64 " pages, eager %.1f MiB/s, loaded %" PRIu64 "/%" PRIu64
            ", double loads %" PRIu64 "\n", mode_name(opts->mode), access_name(opts->access),
            opts->threads, (double)(c->t_ready - c->t0) / 1e9,
            (double)(c->t_complete - c->t0) / 1e9, c->faults,
            mr_samples_pct_us(&c->fault_lat, 0.5), mr_samples_pct_us(&c->fault_lat, 0.99),
            atomic_load(&c->bytes_read), atomic_load(&c->pages_copied),
            atomic_load(&c->pages_zero), eager_mib_s(c), atomic_load(&c->pages_loaded),
            c->total_pages, atomic_load(&c->double_loads));
}

/* Joins the fault threads (after request_stop) and merges what they measured. */
static void join_fault_threads(lctx *c)
{
    for (unsigned i = 0; i < c->nfw; i++) {
        fault_worker *w = &c->fw[i];
        pthread_join(w->th, NULL);
        c->faults += w->faults;
        c->dedup += w->dedup;
        mr_samples_merge(&c->fault_lat, &w->lat);
        mr_samples_merge(&c->st_claim, &w->claim);
        mr_samples_merge(&c->st_pread, &w->pread);
        mr_samples_merge(&c->st_copy, &w->copy);
    }
    c->nfw = 0;
}

/* Stops and joins the threads, unregisters and unmaps, frees c. */
static void teardown(lctx *c)
{
    request_stop(c);
    if (c->et_started)
        pthread_join(c->et, NULL);
    join_fault_threads(c);
    if (c->blocks) {
        for (size_t i = 0; i < c->nblocks; i++)
            if (c->blocks[i].mem) {
                if (c->uffd >= 0) {
                    struct uffdio_range r = {.start = (uintptr_t)c->blocks[i].mem,
                                             .len = map_len(c, &c->blocks[i])};
                    ioctl(c->uffd, UFFDIO_UNREGISTER, &r);
                }
                munmap(c->blocks[i].mem, (size_t)map_len(c, &c->blocks[i]));
            }
        mr_core_free(c->blocks, c->nblocks);
    }
    if (c->uffd >= 0)
        close(c->uffd);
    if (c->fmap)
        munmap((void *)c->fmap, (size_t)c->fmap_len);
    close(c->stop_efd);
    free(c->blocks);
    mr_samples *all[] = {&c->fault_lat, &c->touch_lat, &c->st_claim, &c->st_pread,
                         &c->st_copy, &c->st_event, &c->st_resume};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        mr_samples_free(all[i]);
    if (c->stamps)
        for (size_t i = 0; i < c->nblocks; i++)
            free(c->stamps[i]);
    free(c->stamps);
    free(c);
}

int mr_local_load(int fd, const mr_snapshot *snap, const mr_load_opts *opts, FILE *out,
                  mr_error *err)
{
    lctx *c = calloc(1, sizeof *c);
    if (!c)
        return mr_error_set(err, E_INTERNAL, "out of memory");
    c->fd = fd;
    c->uffd = -1;
    c->snap = snap;
    c->opts = opts;
    c->nblocks = snap->nblocks;
    c->unit = opts->hugepages ? HUGE_PAGE / PAGE : 1;
    c->inj.fault_abandon = mr_inject("fault-abandon");
    c->inj.dup_events = mr_inject("dup-events");
    c->inj.place_twice = mr_inject("place-twice");
    c->inj.wake_fail = mr_inject("uffd-wake-fail");
    c->inj.event_remove = mr_inject("event-remove");
    c->inj.no_fmap = mr_inject("pread-fault");
    if (opts->fault_threads < 1 || opts->fault_threads > MAX_FAULT_THREADS) {
        free(c);
        return mr_error_set(err, E_USAGE, "fault threads must be 1..%u", MAX_FAULT_THREADS);
    }
    c->stop_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->stop_efd < 0) {
        free(c);
        return mr_error_set(err, E_INTERNAL, "eventfd: %s", strerror(errno));
    }
    char digests[MR_MAX_BLOCKS][65];
    int rc = -1;
    if (setup_memory(c) == 0 && restore(c) == 0) {
        digest_blocks(c, digests);
        request_stop(c);
        join_fault_threads(c);
        mr_baseline base;
        if (!atomic_load(&c->failed) &&
            (!opts->baseline_pages ||
             mr_load_baseline(fd, snap, opts->baseline_pages, opts->threads, &base,
                              &c->err) == 0)) {
            mr_samples_sort(&c->fault_lat);
            mr_samples_sort(&c->touch_lat);
            if (opts->json)
                report_json(c, out, digests, opts->baseline_pages ? &base : NULL);
            else
                report_text(c, out, digests);
            rc = 0;
        }
    }
    if (rc != 0)
        *err = c->err.name[0] ? c->err
                              : (mr_error){.name = E_INTERNAL, .msg = "load failed"};
    teardown(c);
    return rc;
}
