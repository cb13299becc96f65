/* Bridge front-end: postcopy migration *source* fed from a mapped-ram file.
 *
 * Wire sequence (reference/postcopy-protocol.md §9, proven on QEMU 10.0.2 in
 * reference/measured-on-these-machines.md):
 *   header + regenerated configuration (no capabilities subsection),
 *   OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE, early_setup sections verbatim,
 *   `ram` START block list (no MappedRamHeaders), one single-page
 *   POSTCOPY_RAM_DISCARD (required on 10.0, else the destination takes the
 *   precopy path after LISTEN and deadlocks), PACKAGED {LISTEN, device
 *   state verbatim, PING 3, RUN}, then PART `ram` sections: requested pages
 *   first, the rest eagerly, each page exactly once; then, once PONG 3 says
 *   the device state is loaded, END and EOF; wait for SHUT.
 *
 * Threads: the main thread is the only writer of the socket; a return-path
 * reader thread parses destination messages and queues page requests.  The
 * sender checks the queue (one atomic load) between pages of the eager
 * stream, so a request waits behind at most one eager read chunk plus what
 * is already in the socket buffer, never behind a whole bulk transfer.
 * Every section is built under out_lock, so records never interleave even
 * if another thread starts sending.
 *
 * --resume (bridge_resume.[ch]): instead of the preamble and package, the
 * postcopy recovery handshake with a destination paused on a lost source
 * (RECV_BITMAP per block, POSTCOPY_RESUME, RESUME_ACK); the pages it
 * already has are claimed, then the same request-first page stream runs.
 */
#define _GNU_SOURCE
#include "bridge.h"

#include "bridge_resume.h"
#include "bridge_net.h"
#include "bridge_preempt.h"
#include "bridge_snap.h"
#include "bridge_ws.h"
#include "mr_errors.h"
#include "mr_json.h"
#include "mr_num.h"
#include "mr_stats.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define OUT_CAP (1u << 20)
#define FLUSH_AT (128u << 10)      /* eager bytes buffered before a send */
#define CHUNK_PAGES 32u            /* pages per eager pread */
#define SECTION_PAGES 256u         /* pages per PART section */
#define RESUME_GRACE_S 0.002       /* --resume: wait for re-sent requests after the ACK */

enum { RAM_ZERO = 0x02, RAM_MEM_SIZE = 0x04, RAM_PAGE = 0x08, RAM_EOS = 0x10,
       RAM_CONTINUE = 0x20 };
enum { CMD_OPEN_RP = 1, CMD_PING = 2, CMD_ADVISE = 3, CMD_LISTEN = 4, CMD_RUN = 5,
       CMD_DISCARD = 6, CMD_PACKAGED = 7 };
/* PING value placed in the package just before RUN: its PONG means the
 * destination's main thread has loaded all device state. */
#define PING_PACKAGE_LOADED 3u
/* PING sent after the preempt connection: by its PONG the destination has
 * (almost always) accepted or dropped that connection. */
#define PING_PREEMPT 2u

enum { RP_SHUT = 1, RP_PONG = 2, RP_REQ_PAGES_ID = 3, RP_REQ_PAGES = 4 };

struct rp_req {
    uint32_t block;
    uint64_t start;
    uint32_t len;
    double t;           /* seconds since start, when read off the socket */
};

struct bridge {
    struct br_snap snap;
    const char *path;
    uint64_t offset;
    const char *to;
    struct br_net_addr addr;    /* --to, parsed (bridge_net.c) */
    int sock;
    int preempt;                /* --preempt: serve requests on a second channel */
    _Atomic(struct br_preempt *) pre;   /* that channel once connected (bridge_preempt.c) */
    struct br_preempt_counts prec;      /* its counters, merged at the end */
    int zero_all;
    int describe_only;
    double io_timeout, shut_timeout, connect_timeout;
    double max_bandwidth;       /* eager stream cap, bytes/s; 0 = none */
    int sndbuf;                 /* SO_SNDBUF, 0 = kernel default */
    int ready_fd;               /* --ready-fd: written "R" and closed once the
                                 * file is parsed, just before connecting; -1 */
    int help;                   /* --help given */
    /* --host-page-size ID=SIZE: destination blocks backed by huge pages */
    struct { const char *id; size_t idlen; uint64_t size; } hps[16];
    size_t nhps;
    struct timespec t_start;
    /* --ws / --record-ws (bridge_ws.c owns the files) */
    const char *ws_path, *record_ws_path;
    int ws_before_run;          /* --ws-mode before-run (default after-run) */
    int ws_mode_set;            /* --ws-mode given (needs --ws) */
    struct br_ws ws, ws_rec;
    uint64_t pages_ws;          /* sent because the working set listed them */
    double eager_delay;         /* --eager-delay: serve only requests this long after RUN */
    double holdoff_s;           /* --eager-holdoff-us: eager pause after each request */
    _Atomic uint64_t last_req_ns;   /* when the latest request arrived (ns after t_start) */
    double holdoff_total_s;     /* time the eager stream spent held off */
    double t_eager_hold_end;

    /* Output: only whole sections are built and sent under out_lock. */
    pthread_mutex_t out_lock;
    uint8_t *out;
    size_t out_len;
    uint8_t *stage;
    int in_section;
    long last_block;    /* block of the previous record in this section, -1 none */
    uint32_t section_pages;

    /* Return path. */
    pthread_t rp_thread;
    int rp_started;
    pthread_mutex_t rp_lock;
    pthread_cond_t rp_cond;
    struct rp_req *q;
    size_t q_head, q_len, q_cap;
    atomic_uint q_pending;
    atomic_int rp_state;        /* 0 open, 1 SHUT received, 2 closed/error */
    uint32_t shut_value;
    int shut_received;
    char rp_err[256];
    uint32_t pongs;
    int package_loaded;         /* PONG for the PING just before RUN arrived */
    uint64_t rp_bad_requests;
    mr_error rp_error;          /* why the return path closed, if it named an E_* */
    struct br_resume resume;    /* --resume: recovery handshake state (rp_lock) */
    double t_bitmaps, t_resume_ack;
    double t_preempt_resumed;   /* --resume --preempt: the new preempt channel is up */
    double wall_resume_ack;     /* CLOCK_REALTIME at RESUME_ACK, for kill -> ACK */
    double wall_start;          /* CLOCK_REALTIME at t_start: puts the loader's
                                 * times on the caller's clock */
    uint64_t resume_requests_first; /* requests served before the first eager page */

    /* Statistics. */
    double t_package_loaded;
    double t_connected, t_run_sent, t_first_request, t_all_sent, t_shut, t_eager0, t_eager1;
    uint64_t bytes_sent, file_bytes_read;
    double send_seconds, read_seconds;  /* time blocked in send() / pread() */
    uint64_t pages_data, pages_zero, pages_on_request, pages_eager;
    uint64_t requests, requests_served, requests_duplicate;
    uint64_t double_sends;
    mr_samples lat;             /* request read -> page sent */
    mr_samples pre_read, pre_send;  /* preempt: the parts of lat in pread() and send() */

    mr_error err;               /* first, root-cause failure */
};

static int preempt_connect(struct bridge *b, uint32_t pongs);
static int inject_due(const char *point);

static double now_s(const struct bridge *b)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - b->t_start.tv_sec) + (double)(t.tv_nsec - b->t_start.tv_nsec) / 1e9;
}

/* Records the first (root-cause) failure; returns -1. */
__attribute__((format(printf, 3, 4)))
static int fail(struct bridge *b, const char *name, const char *fmt, ...)
{
    if (b->err.name[0])
        return -1;
    va_list ap;
    va_start(ap, fmt);
    mr_error_vset(&b->err, name, fmt, ap);
    va_end(ap);
    return -1;
}

static void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

static uint16_t get_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p) { return (uint64_t)get_be32(p) << 32 | get_be32(p + 4); }

/* ---- return path ------------------------------------------------------- */

static void rp_close(struct bridge *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void rp_close(struct bridge *b, const char *fmt, ...)
{
    pthread_mutex_lock(&b->rp_lock);
    if (atomic_load(&b->rp_state) == 0 && fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(b->rp_err, sizeof(b->rp_err), fmt, ap);
        va_end(ap);
    }
    if (atomic_load(&b->rp_state) == 0)
        atomic_store(&b->rp_state, 2);
    pthread_cond_broadcast(&b->rp_cond);
    pthread_mutex_unlock(&b->rp_lock);
    atomic_fetch_add(&b->q_pending, 1);  /* wake the sender's check */
}

/* The return path ends on a named error (bridge_resume.c's checks). */
static void rp_fail(struct bridge *b, const mr_error *e)
{
    pthread_mutex_lock(&b->rp_lock);
    if (atomic_load(&b->rp_state) == 0)
        b->rp_error = *e;
    pthread_mutex_unlock(&b->rp_lock);
    rp_close(b, "%s", e->msg);
}

static void rp_queue(struct bridge *b, uint32_t block, uint64_t start, uint32_t len)
{
    pthread_mutex_lock(&b->rp_lock);
    if (b->q_len == b->q_cap) {
        size_t cap = b->q_cap ? b->q_cap * 2 : 256;
        struct rp_req *q = malloc(cap * sizeof(*q));
        if (!q) {
            pthread_mutex_unlock(&b->rp_lock);
            return;     /* dropped: the page still arrives with the eager stream */
        }
        for (size_t i = 0; i < b->q_len; i++)
            q[i] = b->q[(b->q_head + i) % b->q_cap];
        free(b->q);
        b->q = q;
        b->q_cap = cap;
        b->q_head = 0;
    }
    double t = now_s(b);
    b->q[(b->q_head + b->q_len) % b->q_cap] =
        (struct rp_req){.block = block, .start = start, .len = len, .t = t};
    atomic_store_explicit(&b->last_req_ns, (uint64_t)(t * 1e9), memory_order_relaxed);
    b->q_len++;
    b->requests++;
    if (b->t_first_request == 0)
        b->t_first_request = now_s(b);
    pthread_cond_broadcast(&b->rp_cond);
    pthread_mutex_unlock(&b->rp_lock);
    atomic_fetch_add_explicit(&b->q_pending, 1, memory_order_release);
}

/* A page request on the preempt channel, from the return-path thread. */
static int preempt_serve(struct bridge *b, uint32_t block, uint64_t start, uint32_t len)
{
    pthread_mutex_lock(&b->rp_lock);
    b->requests++;
    double t = now_s(b);
    if (b->t_first_request == 0)
        b->t_first_request = t;
    atomic_store_explicit(&b->last_req_ns, (uint64_t)(t * 1e9), memory_order_relaxed);
    pthread_mutex_unlock(&b->rp_lock);
    if (inject_due("preempt"))      /* test knob: requests stay outstanding */
        for (;;)
            pause();
    if (br_preempt_serve(atomic_load(&b->pre), block, start, len, t) >= 0)
        return 0;
    rp_close(b, "preempt channel failed");   /* check_rp reports the channel's error */
    return -1;
}

static void *rp_main(void *arg)
{
    struct bridge *b = arg;
    long cur_block = -1;
    uint8_t hdr[4], payload[512];
    struct br_rbuf rb;
    br_rbuf_init(&rb, b->sock);
    /* Named so a host can place it apart from the eager stream (the main
     * thread): fastsnap restore --pin, top -H. */
    pthread_setname_np(pthread_self(), "fsl-requests");
    for (;;) {
        int r = br_rbuf_read(&rb, hdr, 4);
        if (r <= 0) {
            rp_close(b, "return path closed by the destination%s%s",
                     r < 0 ? ": " : "", r < 0 ? strerror(errno) : "");
            return NULL;
        }
        uint16_t type = get_be16(hdr), len = get_be16(hdr + 2);
        if (len > sizeof(payload)) {
            rp_close(b, "return-path message type %u with length %u (> 512)", type, len);
            return NULL;
        }
        if (br_rbuf_read(&rb, payload, len) <= 0) {
            rp_close(b, "return path closed inside a message (type %u)", type);
            return NULL;
        }
        switch (type) {
        case RP_SHUT:
            if (len != 4) {
                rp_close(b, "SHUT with length %u", len);
                return NULL;
            }
            pthread_mutex_lock(&b->rp_lock);
            b->shut_received = 1;
            b->shut_value = get_be32(payload);
            b->t_shut = now_s(b);
            atomic_store(&b->rp_state, 1);
            pthread_cond_broadcast(&b->rp_cond);
            pthread_mutex_unlock(&b->rp_lock);
            atomic_fetch_add(&b->q_pending, 1);
            return NULL;
        case RP_PONG:
            pthread_mutex_lock(&b->rp_lock);
            b->pongs++;
            if (len == 4 && get_be32(payload) == PING_PACKAGE_LOADED) {
                b->package_loaded = 1;
                b->t_package_loaded = now_s(b);
            }
            pthread_cond_broadcast(&b->rp_cond);
            pthread_mutex_unlock(&b->rp_lock);
            break;
        case RP_REQ_PAGES_ID:
        case RP_REQ_PAGES: {
            if ((type == RP_REQ_PAGES && len != 12) || (type == RP_REQ_PAGES_ID && len < 14)) {
                rp_close(b, "page request with bad length %u", len);
                return NULL;
            }
            uint64_t start = get_be64(payload);
            uint32_t rlen = get_be32(payload + 8);
            if (type == RP_REQ_PAGES_ID) {
                uint8_t n = payload[12];
                if ((size_t)13 + n != len) {
                    rp_close(b, "REQ_PAGES_ID with bad id length");
                    return NULL;
                }
                cur_block = -1;
                for (size_t i = 0; i < b->snap.nblocks; i++)
                    if (b->snap.blocks[i].idlen == n &&
                        memcmp(b->snap.blocks[i].id, payload + 13, n) == 0)
                        cur_block = (long)i;
            }
            const struct br_block *blk = cur_block >= 0 ? &b->snap.blocks[cur_block] : NULL;
            if (!blk || rlen == 0 || start % b->snap.tps || start >= blk->length ||
                rlen > blk->length - start) {
                pthread_mutex_lock(&b->rp_lock);
                b->rp_bad_requests++;
                pthread_mutex_unlock(&b->rp_lock);
                break;  /* the eager stream still supplies every page */
            }
            if (atomic_load(&b->pre)) {     /* preempt: sent right here, on channel 2 */
                if (preempt_serve(b, (uint32_t)cur_block, start, rlen) < 0)
                    return NULL;
                break;
            }
            rp_queue(b, (uint32_t)cur_block, start, rlen);
            break;
        }
        case BR_RP_RECV_BITMAP: {
            struct br_bitmap_got got;
            mr_error e = {0};
            if (br_resume_read_bitmap(&b->resume, &b->snap, &rb, payload, len, &got, &e) < 0) {
                rp_fail(b, &e);
                return NULL;
            }
            pthread_mutex_lock(&b->rp_lock);
            br_resume_commit(&b->resume, &got);
            pthread_cond_broadcast(&b->rp_cond);
            pthread_mutex_unlock(&b->rp_lock);
            break;
        }
        case BR_RP_RESUME_ACK: {
            mr_error e = {0};
            pthread_mutex_lock(&b->rp_lock);
            int r = br_resume_ack(&b->resume, payload, len, &e);
            pthread_cond_broadcast(&b->rp_cond);
            pthread_mutex_unlock(&b->rp_lock);
            if (r < 0) {
                rp_fail(b, &e);
                return NULL;
            }
            break;
        }
        default:
            break;      /* SWITCHOVER_ACK...: not expected, harmless */
        }
    }
}

/* ---- output ------------------------------------------------------------- */

static int send_loop(struct bridge *b, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t r = send(b->sock, p, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return fail(b, E_DEST_STALLED, "destination stopped reading for "
                            "%.0f s (postcopy paused or hung?)", b->io_timeout);
            if (errno == EPIPE || errno == ECONNRESET) {
                char why[sizeof(b->rp_err)];
                int e = errno;
                pthread_mutex_lock(&b->rp_lock);
                memcpy(why, b->rp_err, sizeof(why));
                pthread_mutex_unlock(&b->rp_lock);
                return fail(b, E_DEST_GONE, "destination closed the migration "
                            "connection (%s)%s%s", strerror(e), why[0] ? "; " : "", why);
            }
            return fail(b, E_IO, "send: %s", strerror(errno));
        }
        p += r;
        n -= (size_t)r;
        b->bytes_sent += (uint64_t)r;
    }
    return 0;
}

static int send_bytes(struct bridge *b, const uint8_t *p, size_t n)
{
    double t = now_s(b);
    int rc = send_loop(b, p, n);
    b->send_seconds += now_s(b) - t;
    return rc;
}

static int flush(struct bridge *b)
{
    int r = send_bytes(b, b->out, b->out_len);
    b->out_len = 0;
    return r;
}

/* Reserve n bytes of output, flushing first if needed. */
static uint8_t *reserve(struct bridge *b, size_t n)
{
    if (b->out_len + n > OUT_CAP && flush(b) < 0)
        return NULL;
    uint8_t *p = b->out + b->out_len;
    b->out_len += n;
    return p;
}

static int emit(struct bridge *b, const void *data, size_t n)
{
    uint8_t *p = reserve(b, n);
    if (!p)
        return -1;
    memcpy(p, data, n);
    return 0;
}

static int emit_cmd(struct bridge *b, uint16_t cmd, const uint8_t *payload, uint16_t len)
{
    uint8_t h[5] = {0x08};
    put_be16(h + 1, cmd);
    put_be16(h + 3, len);
    if (emit(b, h, 5) < 0)
        return -1;
    return len ? emit(b, payload, len) : 0;
}

static int section_begin(struct bridge *b)
{
    uint8_t h[5] = {0x02};
    put_be32(h + 1, b->snap.ram_sid);
    pthread_mutex_lock(&b->out_lock);
    b->in_section = 1;
    b->last_block = -1;
    b->section_pages = 0;
    return emit(b, h, 5);
}

static int section_end_typed(struct bridge *b, uint8_t type)
{
    uint8_t t[13 + 5];
    size_t n = 0;
    if (type == 0x03) {     /* a fresh END section */
        t[0] = 0x03;
        put_be32(t + 1, b->snap.ram_sid);
        n = 5;
    }
    put_be64(t + n, RAM_EOS);
    t[n + 8] = 0x7e;
    put_be32(t + n + 9, b->snap.ram_sid);
    int r = emit(b, t, n + 13);
    if (type != 0x03) {
        b->in_section = 0;
        pthread_mutex_unlock(&b->out_lock);
    }
    return r;
}

static int section_end(struct bridge *b) { return section_end_typed(b, 0x02); }

/* Header of one page record; returns where its TPS data bytes go (PAGE),
 * or a non-NULL pointer past the written 00 byte (ZERO); NULL on error. */
static uint8_t *emit_record(struct bridge *b, uint32_t bi, uint64_t page, int is_data)
{
    const struct br_block *blk = &b->snap.blocks[bi];
    if (!b->in_section && section_begin(b) < 0)
        return NULL;
    int cont = b->last_block == (long)bi;
    size_t n = 8 + (cont ? 0 : 1u + blk->idlen) + (is_data ? b->snap.tps : 1);
    uint8_t *p = reserve(b, n);
    if (!p)
        return NULL;
    uint64_t v = page * b->snap.tps | (is_data ? RAM_PAGE : RAM_ZERO) | (cont ? RAM_CONTINUE : 0);
    put_be64(p, v);
    p += 8;
    if (!cont) {
        *p++ = blk->idlen;
        memcpy(p, blk->id, blk->idlen);
        p += blk->idlen;
    }
    if (!is_data)
        *p = 0;
    b->last_block = (long)bi;
    b->section_pages++;
    if (mr_core_mark_loaded(blk->core, page))
        b->double_sends++;      /* must stay 0: QEMU would hit EEXIST */
    if (is_data)
        b->pages_data++;
    else
        b->pages_zero++;
    return p;
}

/* One page record; data NULL means a ZERO record. */
static int emit_page(struct bridge *b, uint32_t bi, uint64_t page, const uint8_t *data)
{
    uint8_t *slot = emit_record(b, bi, page, data != NULL);
    if (!slot)
        return -1;
    if (data)
        memcpy(slot, data, b->snap.tps);
    return 0;
}

static int short_file(struct bridge *b, const struct br_block *blk, uint64_t page, uint64_t off,
                      size_t done, size_t want)
{
    return fail(b, E_FILE_SHORT, "snapshot file is short: block %s page %llu at offset %#llx: "
                "got %zu of %zu bytes (file truncated while serving?)", blk->id,
                (unsigned long long)(page + done / b->snap.tps),
                (unsigned long long)(off + done), done, want);
}

/* Eager run of n consecutive data pages: headers into the output buffer and
 * the page data read straight into their slots with one preadv (one copy). */
static int emit_run(struct bridge *b, uint32_t bi, uint64_t page, uint64_t n)
{
    const struct br_block *blk = &b->snap.blocks[bi];
    size_t need = 5 + (size_t)n * (8 + 256 + b->snap.tps);
    if (need > OUT_CAP || n > CHUNK_PAGES)
        return fail(b, E_INTERNAL, "eager run of %llu pages does not fit the output buffer",
                    (unsigned long long)n);
    if (b->out_len + need > OUT_CAP && flush(b) < 0)
        return -1;
    struct iovec iov[CHUNK_PAGES];
    for (uint64_t j = 0; j < n; j++) {
        uint8_t *slot = emit_record(b, bi, page + j, 1);
        if (!slot)
            return -1;
        iov[j] = (struct iovec){.iov_base = slot, .iov_len = b->snap.tps};
    }
    size_t want = (size_t)n * b->snap.tps, done = 0;
    uint64_t off = blk->pages_offset + page * b->snap.tps;
    double t = now_s(b);
    int first = 0;
    while (done < want) {
        ssize_t r = preadv(b->snap.fd, iov + first, (int)n - first, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail(b, E_IO, "reading block %s page %llu: %s", blk->id,
                        (unsigned long long)page, strerror(errno));
        if (r == 0)
            return short_file(b, blk, page, off, done, want);
        done += (size_t)r;
        while (r > 0) {     /* advance over what was read */
            if ((size_t)r >= iov[first].iov_len) {
                r -= (ssize_t)iov[first].iov_len;
                first++;
            } else {
                iov[first].iov_base = (uint8_t *)iov[first].iov_base + r;
                iov[first].iov_len -= (size_t)r;
                r = 0;
            }
        }
    }
    b->file_bytes_read += want;
    b->read_seconds += now_s(b) - t;
    return 0;
}

static int read_pages(struct bridge *b, const struct br_block *blk, uint64_t page, uint64_t n);

/* Every target page of the host page starting at `first`, consecutively
 * (data runs and ZERO records, whatever --zero-pages says): a destination
 * with huge pages assembles the host page from them and refuses another
 * host page's record in between.  The caller has claimed them all. */
static int emit_host_page(struct bridge *b, uint32_t bi, uint64_t first, uint64_t max_run)
{
    struct br_block *blk = &b->snap.blocks[bi];
    uint64_t end = first + blk->host_pages < blk->npages ? first + blk->host_pages : blk->npages;
    for (uint64_t p = first; p < end;) {
        if (!mr_core_bit(blk->core, p)) {
            if (emit_page(b, bi, p, NULL) < 0)
                return -1;
            p++;
            continue;
        }
        uint64_t k = 1;
        while (p + k < end && k < max_run && mr_core_bit(blk->core, p + k))
            k++;
        if (emit_run(b, bi, p, k) < 0)
            return -1;
        p += k;
    }
    return 0;
}

/* Claims a whole host page; 0 if its first page was claimed already (then all were). */
static int claim_host_page(struct br_block *blk, uint64_t first)
{
    if (!mr_core_claim(blk->core, first))
        return 0;
    for (uint64_t p = first + 1; p < first + blk->host_pages && p < blk->npages; p++)
        mr_core_claim(blk->core, p);
    return 1;
}

static uint64_t max_run_pages(const struct bridge *b)
{
    /* A run's records must fit the output buffer at once (emit_run reads
     * into slots that a flush would invalidate): matters for 64 KiB TPS. */
    uint64_t max_run = (OUT_CAP - 5) / (8 + 256 + b->snap.tps);
    return max_run > CHUNK_PAGES ? CHUNK_PAGES : max_run;
}

static int read_pages(struct bridge *b, const struct br_block *blk, uint64_t page, uint64_t n)
{
    size_t want = (size_t)(n * b->snap.tps), done = 0;
    uint64_t off = blk->pages_offset + page * b->snap.tps;
    double t = now_s(b);
    while (done < want) {
        ssize_t r = pread(b->snap.fd, b->stage + done, want - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail(b, E_IO, "reading block %s page %llu at %#llx: %s", blk->id,
                        (unsigned long long)page, (unsigned long long)(off + done),
                        strerror(errno));
        if (r == 0)
            return short_file(b, blk, page, off, done, want);
        done += (size_t)r;
    }
    b->file_bytes_read += want;
    b->read_seconds += now_s(b) - t;
    return 0;
}

static void record_latency(struct bridge *b, double t_req)
{
    double s = now_s(b) - t_req;
    mr_samples_add(&b->lat, s > 0 ? (uint64_t)(s * 1e9) : 0);
}

static int check_rp(struct bridge *b)
{
    int st = atomic_load(&b->rp_state);
    if (st == 1 && b->shut_value != 0)
        return fail(b, E_DEST_FAILED, "destination reported a failed migration "
                    "(SHUT %u); see the destination's log", b->shut_value);
    if (st == 1)        /* SHUT 0: the destination completed; a preempt channel
                           it closed meanwhile changes nothing */
        return 0;
    if (st == 2 && b->rp_error.name[0])
        return fail(b, b->rp_error.name, "%s", b->rp_error.msg);
    const mr_error *pe = atomic_load(&b->pre) ? br_preempt_error(atomic_load(&b->pre)) : NULL;
    if (pe)
        return fail(b, pe->name, "%s", pe->msg);
    if (st == 2)
        return fail(b, E_DEST_GONE, "%s", b->rp_err[0] ? b->rp_err
                    : "return path closed by the destination");
    return 0;
}

/* Serve every queued request; then flush so the pages leave at once. */
static int serve_requests(struct bridge *b)
{
    if (atomic_exchange_explicit(&b->q_pending, 0, memory_order_acquire) == 0)
        return 0;
    if (check_rp(b) < 0)
        return -1;
    struct rp_req done[64];
    size_t ndone = 0;
    int sent_any = 0;
    for (;;) {
        pthread_mutex_lock(&b->rp_lock);
        if (b->q_len == 0) {
            pthread_mutex_unlock(&b->rp_lock);
            break;
        }
        struct rp_req rq = b->q[b->q_head];
        b->q_head = (b->q_head + 1) % b->q_cap;
        b->q_len--;
        pthread_mutex_unlock(&b->rp_lock);
        struct br_block *blk = &b->snap.blocks[rq.block];
        /* 64-bit: a length near 2^32 must not wrap to zero pages. */
        uint64_t first = rq.start / b->snap.tps;
        uint64_t n = ((uint64_t)rq.len + b->snap.tps - 1) / b->snap.tps;
        if (b->record_ws_path)
            br_ws_note(&b->ws_rec, rq.block, first, n);
        int served = 0;
        if (blk->host_pages > 1) {
            uint64_t hp = blk->host_pages;
            for (uint64_t u = first - first % hp; u < first + n; u += hp) {
                if (!claim_host_page(blk, u))
                    continue;
                if (emit_host_page(b, rq.block, u, max_run_pages(b)) < 0)
                    return -1;
                uint64_t cnt = u + hp < blk->npages ? hp : blk->npages - u;
                b->pages_on_request += cnt;
                served = 1;
            }
        }
        for (uint64_t p = first; blk->host_pages == 1 && p < first + n; p++) {
            if (!mr_core_claim(blk->core, p))
                continue;
            const uint8_t *data = NULL;
            if (mr_core_bit(blk->core, p)) {
                if (read_pages(b, blk, p, 1) < 0)
                    return -1;
                data = b->stage;
            }
            if (emit_page(b, rq.block, p, data) < 0)
                return -1;
            b->pages_on_request++;
            served = 1;
        }
        if (served) {
            b->requests_served++;
            sent_any = 1;
            if (ndone == sizeof(done) / sizeof(done[0])) {
                if (flush(b) < 0)
                    return -1;
                for (size_t i = 0; i < ndone; i++)
                    record_latency(b, done[i].t);
                ndone = 0;
            }
            done[ndone++] = rq;
        } else {
            b->requests_duplicate++;
        }
    }
    if (sent_any) {
        if (flush(b) < 0)
            return -1;
        for (size_t i = 0; i < ndone; i++)
            record_latency(b, done[i].t);
    }
    return 0;
}

/* ---- phases ---------------------------------------------------------------- */

static int send_preamble(struct bridge *b)
{
    const struct br_snap *s = &b->snap;
    uint8_t h[13] = {0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0x07};
    put_be32(h + 9, s->machine_len);
    if (emit(b, h, 13) < 0 || emit(b, s->machine, s->machine_len) < 0 ||
        emit(b, s->cfg_keep, s->cfg_keep_len) < 0)
        return -1;
    if (emit_cmd(b, CMD_OPEN_RP, NULL, 0) < 0 || flush(b) < 0)
        return -1;
    return 0;
}

static int send_setup(struct bridge *b)
{
    const struct br_snap *s = &b->snap;
    uint8_t p[16];
    put_be32(p, 1);
    if (emit_cmd(b, CMD_PING, p, 4) < 0)
        return -1;
    uint64_t summary = s->tps;  /* OR of every destination block's page size */
    for (size_t i = 0; i < s->nblocks; i++)
        summary |= s->blocks[i].host_pages * s->tps;
    put_be64(p, summary);
    put_be64(p + 8, s->tps);
    if (emit_cmd(b, CMD_ADVISE, p, 16) < 0)
        return -1;
    /* early_setup FULL sections, verbatim */
    for (uint64_t done = 0; done < s->early_len;) {
        size_t n = s->early_len - done > CHUNK_PAGES * s->tps ? CHUNK_PAGES * s->tps
                                                               : (size_t)(s->early_len - done);
        ssize_t r = pread(s->fd, b->stage, n, (off_t)(s->early_off + done));
        if (r <= 0)
            return fail(b, E_FILE_SHORT, "reading early-setup sections: %s",
                        r < 0 ? strerror(errno) : "file ended");
        if (emit(b, b->stage, (size_t)r) < 0)
            return -1;
        done += (uint64_t)r;
    }
    /* `ram` START: block list without MappedRamHeaders */
    uint8_t st[17 + 8] = {0x01};
    put_be32(st + 1, s->ram_sid);
    memcpy(st + 5, "\x03ram", 4);
    put_be32(st + 9, 0);
    put_be32(st + 13, 4);
    put_be64(st + 17, s->ram_total | RAM_MEM_SIZE);
    if (emit(b, st, sizeof st) < 0)
        return -1;
    for (size_t i = 0; i < s->nblocks; i++) {
        const struct br_block *blk = &s->blocks[i];
        uint8_t l[8];
        put_be64(l, blk->length);
        if (emit(b, &blk->idlen, 1) < 0 || emit(b, blk->id, blk->idlen) < 0 || emit(b, l, 8) < 0)
            return -1;
        /* page_size only for a block whose host page differs from the
         * destination's default (max(host page 4 KiB, TPS)), e.g. hugetlbfs */
        uint64_t page_size = blk->host_pages * s->tps, dflt = s->tps > 4096 ? s->tps : 4096;
        if (page_size != dflt) {
            put_be64(l, page_size);
            if (emit(b, l, 8) < 0)
                return -1;
        }
    }
    uint8_t eos[13];
    put_be64(eos, RAM_EOS);
    eos[8] = 0x7e;
    put_be32(eos + 9, s->ram_sid);
    if (emit(b, eos, 13) < 0)
        return -1;
    /* One single-page discard of the first block (see the file comment). */
    const struct br_block *b0 = &s->blocks[0];
    uint8_t d[3 + 255 + 16];
    size_t dn = 0;
    d[dn++] = 0;
    d[dn++] = b0->idlen;
    memcpy(d + dn, b0->id, b0->idlen);
    dn += b0->idlen;
    d[dn++] = 0;
    put_be64(d + dn, 0);
    put_be64(d + dn + 8, b0->host_pages * s->tps);   /* discards are host-page aligned */
    dn += 16;
    if (emit_cmd(b, CMD_DISCARD, d, (uint16_t)dn) < 0 || flush(b) < 0)
        return -1;
    return 0;
}

/* Debug knob for recovery tests: FASTSNAP_LOADER_INJECT=serve-hang-in-POINT:FLAG
 * makes the loader that removes FLAG (one loader only, also across restarts)
 * stop at POINT (`package`: half the package is on the wire, so the
 * destination is still reading it; `eager`: half the eager pages are;
 * `preempt`: the return-path thread, before it answers its first request on
 * the preempt channel, so requests stay outstanding; --resume only:
 * `resume-connect` before connecting, `resume-preempt` after the bitmaps,
 * before the preempt connection, `resume-ack` with both channels up, before
 * POSTCOPY_RESUME), so a test's SIGKILL lands there.  inject_due() only
 * checks (any thread); inject_hang() also flushes what the main thread has
 * built, then stops. */
static int inject_due(const char *point)
{
    static const char key[] = "serve-hang-in-";
    const char *v = getenv("FASTSNAP_LOADER_INJECT");
    size_t n = strlen(point);
    return v && strncmp(v, key, sizeof key - 1) == 0 && strncmp(v + sizeof key - 1, point, n) == 0
        && v[sizeof key - 1 + n] == ':' && unlink(v + sizeof key + n) == 0;
}

static void inject_hang(struct bridge *b, const char *point)
{
    if (!inject_due(point))
        return;
    if (b->in_section && section_end(b) < 0)
        return;
    if (flush(b) < 0)
        return;
    for (;;)
        pause();
}

static int send_package(struct bridge *b)
{
    const struct br_snap *s = &b->snap;
    uint64_t n = s->dev_len + 10 + 9;   /* LISTEN, RUN; PING */
    if (n > UINT32_MAX)
        return fail(b, E_UNSUPPORTED, "device state of %llu bytes",
                    (unsigned long long)s->dev_len);
    uint8_t p[4];
    put_be32(p, (uint32_t)n);
    if (emit_cmd(b, CMD_PACKAGED, p, 4) < 0 || emit_cmd(b, CMD_LISTEN, NULL, 0) < 0)
        return -1;
    for (uint64_t done = 0; done < s->dev_len;) {
        size_t want = s->dev_len - done > OUT_CAP / 2 ? OUT_CAP / 2 : (size_t)(s->dev_len - done);
        uint8_t *dst = reserve(b, want);
        if (!dst)
            return -1;
        size_t got = 0;
        while (got < want) {
            ssize_t r = pread(s->fd, dst + got, want - got, (off_t)(s->dev_off + done + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return fail(b, E_FILE_SHORT, "reading device state at %#llx: %s",
                            (unsigned long long)(s->dev_off + done + got),
                            r < 0 ? strerror(errno) : "file ended");
            got += (size_t)r;
        }
        done += want;
        if (done >= s->dev_len / 2 && done - want < s->dev_len / 2)
            inject_hang(b, "package");
    }
    put_be32(p, PING_PACKAGE_LOADED);
    if (emit_cmd(b, CMD_PING, p, 4) < 0 || emit_cmd(b, CMD_RUN, NULL, 0) < 0 || flush(b) < 0)
        return -1;
    b->t_run_sent = now_s(b);
    return 0;
}

/* One step of holding the eager stream for *wait* s: serve what is queued,
 * else send the partial eager buffer and nap at most *nap_max* s. */
static int hold_step(struct bridge *b, double wait, double nap_max)
{
    if (atomic_load_explicit(&b->q_pending, memory_order_relaxed))
        return serve_requests(b);
    if (b->out_len && flush(b) < 0)
        return -1;
    struct timespec ts = {0, (long)((wait < nap_max ? wait : nap_max) * 1e9)};
    nanosleep(&ts, NULL);
    return 0;
}

/* Hold the eager stream to --max-bandwidth, serving requests while waiting. */
static int throttle(struct bridge *b)
{
    while (b->max_bandwidth > 0) {
        double due = b->t_eager0 + (double)b->pages_eager * b->snap.tps / b->max_bandwidth;
        double wait = due - now_s(b);
        if (wait <= 0)
            return 0;
        if (hold_step(b, wait, 0.002) < 0)
            return -1;
    }
    return 0;
}

/* --eager-holdoff-us: no eager page goes out until that long after the
 * latest page request (requests are served meanwhile), so the two cores are
 * left to the request's path: QEMU's fault thread, the return path or
 * preempt channel, QEMU placing the page and waking the vCPU. */
static int holdoff(struct bridge *b)
{
    while (b->holdoff_s > 0) {
        uint64_t last = atomic_load_explicit(&b->last_req_ns, memory_order_relaxed);
        double now = now_s(b), wait = last ? (double)last / 1e9 + b->holdoff_s - now : 0;
        if (wait <= 0)
            return 0;
        if (hold_step(b, wait, 0.001) < 0)
            return -1;
        b->holdoff_total_s += now_s(b) - now;
    }
    return 0;
}

/* --ws: the listed pages first, in their recorded order (before RUN they
 * load through the destination's precopy path, after RUN they lead the
 * eager stream); requests are still served between pages. */
static int send_ws(struct bridge *b)
{
    for (uint64_t i = 0; i < b->ws.n; i++) {
        if (atomic_load_explicit(&b->q_pending, memory_order_relaxed) && serve_requests(b) < 0)
            return -1;
        uint32_t bi = b->ws.e[i].block;
        struct br_block *blk = &b->snap.blocks[bi];
        uint64_t p = b->ws.e[i].page;
        if (blk->host_pages > 1) {
            p -= p % blk->host_pages;
            if (!claim_host_page(blk, p))
                continue;
            if (emit_host_page(b, bi, p, max_run_pages(b)) < 0)
                return -1;
            b->pages_ws += p + blk->host_pages < blk->npages ? blk->host_pages : blk->npages - p;
        } else {
            if (!mr_core_claim(blk->core, p))
                continue;
            if (mr_core_bit(blk->core, p) && read_pages(b, blk, p, 1) < 0)
                return -1;
            if (emit_page(b, bi, p, mr_core_bit(blk->core, p) ? b->stage : NULL) < 0)
                return -1;
            b->pages_ws++;
        }
        if (b->in_section && b->section_pages >= SECTION_PAGES && section_end(b) < 0)
            return -1;
        if (b->out_len >= FLUSH_AT && (flush(b) < 0 || check_rp(b) < 0))
            return -1;
    }
    if (b->in_section && section_end(b) < 0)
        return -1;
    return flush(b);
}

static int send_pages(struct bridge *b)
{
    const struct br_snap *s = &b->snap;
    if (!b->ws_before_run && send_ws(b) < 0)
        return -1;
    b->t_eager0 = now_s(b);
    uint64_t max_run = max_run_pages(b), half = 0;
    for (uint32_t bi = 0; bi < s->nblocks; bi++)
        half += s->blocks[bi].set_pages / 2;
    for (uint32_t bi = 0; bi < s->nblocks; bi++) {
        struct br_block *blk = &s->blocks[bi];
        uint64_t p = 0;
        while (p < blk->npages) {
            if (atomic_load_explicit(&b->q_pending, memory_order_relaxed) && serve_requests(b) < 0)
                return -1;
            if (throttle(b) < 0 || holdoff(b) < 0)
                return -1;
            if (blk->host_pages > 1) {  /* whole host pages, requests only in between */
                if (claim_host_page(blk, p)) {
                    if (emit_host_page(b, bi, p, max_run) < 0)
                        return -1;
                    b->pages_eager += p + blk->host_pages < blk->npages ? blk->host_pages
                                                                         : blk->npages - p;
                }
                p += blk->host_pages;
                if (b->in_section && b->section_pages >= SECTION_PAGES && section_end(b) < 0)
                    return -1;
                if (b->out_len >= FLUSH_AT && (flush(b) < 0 || check_rp(b) < 0))
                    return -1;
                continue;
            }
            /* Skip whole words with nothing left to send. */
            if ((p & 63) == 0 && p + 64 <= blk->npages) {
                uint64_t todo = ~mr_core_claimed_word(blk->core, p);
                if (!b->zero_all)
                    todo &= mr_core_file_word(blk->core, p);
                if (!todo) {
                    p += 64;
                    continue;
                }
            }
            if (mr_core_is_claimed(blk->core, p)) {
                p++;
                continue;
            }
            if (!mr_core_bit(blk->core, p)) {
                if (b->zero_all && mr_core_claim(blk->core, p)) {
                    if (emit_page(b, bi, p, NULL) < 0)
                        return -1;
                    b->pages_eager++;
                }
                p++;
            } else {
                /* Claim the run page by page: with a preempt channel the
                 * return-path thread claims requested pages concurrently. */
                uint64_t k = 0;
                while (p + k < blk->npages && k < max_run && mr_core_bit(blk->core, p + k) &&
                       mr_core_claim(blk->core, p + k))
                    k++;
                if (k == 0) {
                    p++;
                    continue;
                }
                if (emit_run(b, bi, p, k) < 0)
                    return -1;
                b->pages_eager += k;
                p += k;
                if (b->pages_eager >= half && b->pages_eager - k < half)
                    inject_hang(b, "eager");
            }
            if (b->in_section && b->section_pages >= SECTION_PAGES && section_end(b) < 0)
                return -1;
            if (b->out_len >= FLUSH_AT) {
                if (flush(b) < 0 || check_rp(b) < 0)
                    return -1;
            }
        }
    }
    if (b->in_section && section_end(b) < 0)
        return -1;
    if (flush(b) < 0)
        return -1;
    b->t_eager1 = now_s(b);
    return 0;
}

static void deadline_in(struct timespec *dl, double seconds)
{
    clock_gettime(CLOCK_REALTIME, dl);
    double whole = floor(seconds);
    dl->tv_sec += (time_t)whole;
    dl->tv_nsec += (long)((seconds - whole) * 1e9);
    if (dl->tv_nsec >= 1000000000L) {
        dl->tv_sec++;
        dl->tv_nsec -= 1000000000L;
    }
}

/* EOF must not overtake the device-state load: after EOF the destination's
 * listen thread stops reading pages and waits for the main thread, so a
 * device that faults on a page not yet sent (a clear-bit page, with
 * --zero-pages requested) would deadlock it.  Serve requests until the
 * PONG of the PING placed just before RUN says the package is loaded. */
static int wait_package_loaded(struct bridge *b)
{
    struct timespec dl;
    deadline_in(&dl, b->io_timeout);
    for (;;) {
        if (serve_requests(b) < 0)
            return -1;
        pthread_mutex_lock(&b->rp_lock);
        int rc = 0;
        while (!b->package_loaded && atomic_load(&b->rp_state) == 0 && b->q_len == 0 && rc == 0)
            rc = pthread_cond_timedwait(&b->rp_cond, &b->rp_lock, &dl);
        int loaded = b->package_loaded, queued = b->q_len != 0;
        pthread_mutex_unlock(&b->rp_lock);
        if (loaded)
            return serve_requests(b);
        if (check_rp(b) < 0)
            return -1;
        if (rc != 0 && !queued)
            return fail(b, E_TIMEOUT, "destination did not finish loading the "
                        "device state within %.0f s", b->io_timeout);
    }
}

/* --resume: wait until every block's RECV_BITMAP (ack 0) or the RESUME_ACK (ack 1) arrived. */
static int wait_resume(struct bridge *b, int ack)
{
    struct timespec dl;
    deadline_in(&dl, b->io_timeout);
    pthread_mutex_lock(&b->rp_lock);
    int rc = 0;
    while (atomic_load(&b->rp_state) == 0 && rc == 0 &&
           (ack ? !b->resume.acked : b->resume.ngot < b->snap.nblocks))
        rc = pthread_cond_timedwait(&b->rp_cond, &b->rp_lock, &dl);
    int done = ack ? b->resume.acked : b->resume.ngot == b->snap.nblocks;
    pthread_mutex_unlock(&b->rp_lock);
    if (done)
        return 0;
    if (check_rp(b) < 0)
        return -1;
    return fail(b, E_TIMEOUT, "no %s from the destination within %.0f s (is it paused in "
                "postcopy, with migrate-recover listening on --to?)",
                ack ? "RESUME_ACK" : "RECV_BITMAP for every block", b->io_timeout);
}

/* --resume: the recovery handshake (bridge_resume.h); then requests the
 * destination re-sends after its ACK are served before any eager page. */
static int resume_handshake(struct bridge *b)
{
    uint8_t p[256];
    for (size_t i = 0; i < b->snap.nblocks; i++) {
        size_t n = br_resume_bitmap_cmd(&b->snap.blocks[i], p);
        if (emit_cmd(b, BR_CMD_RECV_BITMAP, p, (uint16_t)n) < 0)
            return -1;
    }
    if (flush(b) < 0 || wait_resume(b, 0) < 0)
        return -1;
    b->t_bitmaps = now_s(b);
    /* --preempt: the destination has taken the main connection (it answered
     * on it), so the next one is its new preempt channel; it must be there
     * before POSTCOPY_RESUME, whose handler waits for it (see
     * bridge_resume.h).  PING/PONG 1 checks it was not dropped. */
    if (b->preempt) {
        inject_hang(b, "resume-preempt");
        if (preempt_connect(b, 1) < 0)
            return -1;
        b->t_preempt_resumed = now_s(b);
        inject_hang(b, "resume-ack");
    }
    pthread_mutex_lock(&b->rp_lock);
    b->resume.resume_sent = 1;
    pthread_mutex_unlock(&b->rp_lock);
    if (emit_cmd(b, BR_CMD_POSTCOPY_RESUME, NULL, 0) < 0 || flush(b) < 0 ||
        wait_resume(b, 1) < 0)
        return -1;
    b->t_resume_ack = now_s(b);
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    b->wall_resume_ack = (double)wall.tv_sec + (double)wall.tv_nsec / 1e9;
    /* QEMU re-sends every request still pending right after its ACK: give
     * the first one RESUME_GRACE_S to arrive, so they go out before any
     * eager page (the faulting vCPUs have waited since the loss). */
    struct timespec dl;
    deadline_in(&dl, RESUME_GRACE_S);
    pthread_mutex_lock(&b->rp_lock);
    b->package_loaded = 1;      /* RUN was processed before the destination paused */
    int rc = 0;
    while (b->q_len == 0 && atomic_load(&b->rp_state) == 0 && rc == 0)
        rc = pthread_cond_timedwait(&b->rp_cond, &b->rp_lock, &dl);
    pthread_mutex_unlock(&b->rp_lock);
    atomic_fetch_add(&b->q_pending, 1);     /* rp_queue may not have raised it yet */
    if (serve_requests(b) < 0)
        return -1;
    b->resume_requests_first = b->requests_served;
    return 0;
}

/* --eager-delay S: after RUN serve only requests, for S seconds or until
 * SIGUSR1 (blocked in every thread; taken here with sigtimedwait), so a
 * --record-ws run sees every page the guest touches meanwhile. */
static int hold_eager(struct bridge *b)
{
    double due = b->t_run_sent + b->eager_delay;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    for (;;) {
        struct timespec zero = {0, 0};
        double left = due - now_s(b);
        if (left <= 0 || sigtimedwait(&usr1, NULL, &zero) == SIGUSR1)
            break;
        if (serve_requests(b) < 0 || check_rp(b) < 0)
            return -1;
        struct timespec dl;
        deadline_in(&dl, left < 0.005 ? left : 0.005);
        pthread_mutex_lock(&b->rp_lock);
        if (b->q_len == 0 && atomic_load(&b->rp_state) == 0)
            pthread_cond_timedwait(&b->rp_cond, &b->rp_lock, &dl);
        pthread_mutex_unlock(&b->rp_lock);
    }
    b->t_eager_hold_end = now_s(b);
    return 0;
}

static int send_end(struct bridge *b)
{
    if (wait_package_loaded(b) < 0)
        return -1;
    if (b->in_section && section_end(b) < 0)
        return -1;
    if (atomic_load(&b->pre)) {
        if (br_preempt_check(atomic_load(&b->pre)) < 0)
            return check_rp(b); /* no EOF: a page lost on that channel would read as zero */
        br_preempt_eof(atomic_load(&b->pre));
    }
    pthread_mutex_lock(&b->out_lock);
    int r = section_end_typed(b, 0x03);
    uint8_t eof = 0x00;
    if (r == 0)
        r = emit(b, &eof, 1);
    if (r == 0)
        r = flush(b);
    pthread_mutex_unlock(&b->out_lock);
    if (r < 0)
        return -1;
    b->t_all_sent = now_s(b);
    return 0;
}

static int wait_shut(struct bridge *b)
{
    struct timespec dl;
    deadline_in(&dl, b->shut_timeout);
    pthread_mutex_lock(&b->rp_lock);
    int rc = 0;
    while (atomic_load(&b->rp_state) == 0 && rc == 0)
        rc = pthread_cond_timedwait(&b->rp_cond, &b->rp_lock, &dl);
    pthread_mutex_unlock(&b->rp_lock);
    if (atomic_load(&b->rp_state) == 0)
        return fail(b, E_TIMEOUT, "no SHUT from the destination within %.1f s after EOF",
                    b->shut_timeout);
    return check_rp(b);
}

/* ---- connection (addresses and sockets: bridge_net.c) --------------------- */

static int connect_to(struct bridge *b)
{
    b->sock = br_net_connect(&b->addr, b->connect_timeout, &b->err);
    if (b->sock < 0)
        return -1;
    struct timeval tv = {.tv_sec = (time_t)b->io_timeout,
                         .tv_usec = (suseconds_t)((b->io_timeout - floor(b->io_timeout)) * 1e6)};
    if (setsockopt(b->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        return fail(b, E_CONNECT, "--to %s is not a socket: %s", b->to, strerror(errno));
    if (b->sndbuf > 0 && setsockopt(b->sock, SOL_SOCKET, SO_SNDBUF, &b->sndbuf,
                                    sizeof b->sndbuf) < 0)
        return fail(b, E_CONNECT, "SO_SNDBUF %d: %s", b->sndbuf, strerror(errno));
    b->t_connected = now_s(b);
    return 0;
}

static int wait_pongs(struct bridge *b, uint32_t n)
{
    struct timespec dl;
    deadline_in(&dl, b->io_timeout);
    pthread_mutex_lock(&b->rp_lock);
    int rc = 0;
    while (b->pongs < n && atomic_load(&b->rp_state) == 0 && rc == 0)
        rc = pthread_cond_timedwait(&b->rp_cond, &b->rp_lock, &dl);
    int ponged = b->pongs >= n;
    pthread_mutex_unlock(&b->rp_lock);
    if (check_rp(b) < 0)
        return -1;
    if (!ponged)
        return fail(b, E_TIMEOUT, "no PONG from the destination within %.0f s", b->io_timeout);
    return 0;
}

/* --preempt: once PONG 1 shows the destination took the main connection
 * (it tells channels apart by their order), open the second one.  A
 * destination without postcopy-preempt drops it ("Extra incoming migration
 * connection; ignoring"): by PONG 2 that has normally happened, so a closed
 * connection is refused here rather than found when a page is lost on it. */
static int preempt_open(struct bridge *b)
{
    return wait_pongs(b, 1) < 0 ? -1 : preempt_connect(b, 2);
}

/* The second connection, then a PING whose PONG (the `pongs`-th) shows the
 * destination has (almost always) accepted or dropped it by then.  A new
 * br_preempt starts with no previous block, so its first record names its
 * block (a resumed destination's preempt thread may still hold the old
 * channel's last block). */
static int preempt_connect(struct bridge *b, uint32_t pongs)
{
    int fd = br_net_connect(&b->addr, b->connect_timeout, &b->err);
    if (fd < 0)
        return -1;
    uint8_t p[4], peek;
    put_be32(p, PING_PREEMPT);
    if (emit_cmd(b, CMD_PING, p, 4) < 0 || flush(b) < 0 || wait_pongs(b, pongs) < 0) {
        close(fd);
        return -1;
    }
    ssize_t r = recv(fd, &peek, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
        close(fd);
        return fail(b, E_CONNECT, "the destination closed the preempt connection: is its "
                    "postcopy-preempt capability on? (without it QEMU logs \"Extra incoming "
                    "migration connection; ignoring\"); run without --preempt otherwise");
    }
    struct br_preempt *pre = br_preempt_new(&b->snap, fd, &b->t_start, b->io_timeout);
    if (!pre)
        return fail(b, E_INTERNAL, "out of memory");
    atomic_store(&b->pre, pre);
    return 0;
}

/* ---- statistics --------------------------------------------------------- */

static void write_stats(struct bridge *b, FILE *f, int rc)
{
    uint64_t ram = 0, set = 0;
    for (size_t i = 0; i < b->snap.nblocks; i++) {
        ram += b->snap.blocks[i].length;
        set += b->snap.blocks[i].set_pages;
    }
    double eager_s = b->t_eager1 > b->t_eager0 ? b->t_eager1 - b->t_eager0 : 0;
    double eager_bytes = (double)b->pages_eager * b->snap.tps;
    fprintf(f, "{\"ok\": %s, \"exit_code\": %d, \"error_name\": ", rc == 0 ? "true" : "false", rc);
    if (b->err.name[0])
        mr_json_string(f, b->err.name);
    else
        fputs("null", f);
    fputs(", \"error\": ", f);
    if (b->err.name[0])
        mr_json_string(f, b->err.msg);
    else
        fputs("null", f);
    fputs(", \"machine\": ", f);
    mr_json_string(f, b->snap.machine);
    fprintf(f, ", \"blocks\": %zu, \"ram_bytes\": %llu, \"file_pages_set\": %llu, "
            "\"zero_pages\": \"%s\", \"shut\": ", b->snap.nblocks, (unsigned long long)ram,
            (unsigned long long)set, b->zero_all ? "all" : "requested");
    if (b->shut_received)
        fprintf(f, "%u", b->shut_value);
    else
        fputs("null", f);
    fprintf(f, ", \"time_connected_s\": %.6f, \"time_to_run_sent_s\": %.6f, "
            "\"time_first_request_s\": %.6f, \"time_device_state_loaded_s\": %.6f, "
            "\"time_to_all_sent_s\": %.6f, "
            "\"time_to_shut_s\": %.6f, \"eager_seconds\": %.6f, "
            "\"eager_throughput_mib_s\": %.1f, \"bytes_sent\": %llu, \"file_bytes_read\": %llu, "
            "\"pages_data\": %llu, \"pages_zero\": %llu, \"pages_on_request\": %llu, "
            "\"pages_eager\": %llu, \"requests\": %llu, \"requests_served\": %llu, "
            "\"requests_duplicate\": %llu, \"requests_invalid\": %llu, \"pongs\": %u, "
            "\"send_blocked_s\": %.6f, \"read_s\": %.6f, \"double_sends\": %llu, ",
            b->t_connected, b->t_run_sent, b->t_first_request, b->t_package_loaded,
            b->t_all_sent, b->t_shut,
            eager_s, eager_s > 0 ? eager_bytes / eager_s / (1 << 20) : 0.0,
            (unsigned long long)b->bytes_sent, (unsigned long long)b->file_bytes_read,
            (unsigned long long)b->pages_data, (unsigned long long)b->pages_zero,
            (unsigned long long)b->pages_on_request, (unsigned long long)b->pages_eager,
            (unsigned long long)b->requests, (unsigned long long)b->requests_served,
            (unsigned long long)b->requests_duplicate, (unsigned long long)b->rp_bad_requests,
            b->pongs, b->send_seconds, b->read_seconds, (unsigned long long)b->double_sends);
    fprintf(f, "\"resume\": %s, \"pages_present\": %llu, \"pages_present_zero\": %llu, "
            "\"time_bitmaps_s\": %.6f, \"time_resume_ack_s\": %.6f, "
            "\"resume_ack_unix_s\": %.6f, \"resume_requests_first\": %llu, "
            "\"start_unix_s\": %.6f, \"time_preempt_resumed_s\": %.6f, ",
            b->resume.active ? "true" : "false", (unsigned long long)b->resume.pages_present,
            (unsigned long long)b->resume.pages_present_zero, b->t_bitmaps, b->t_resume_ack,
            b->wall_resume_ack, (unsigned long long)b->resume_requests_first, b->wall_start,
            b->t_preempt_resumed);
    const char *ws_mode = !b->ws_path ? "none" : b->ws_before_run ? "before-run" : "after-run";
    fprintf(f, "\"ws_mode\": \"%s\", \"ws_loaded\": %llu, \"pages_ws\": %llu, "
            "\"ws_recorded\": %llu, \"eager_hold_end_s\": %.6f, ", ws_mode,
            (unsigned long long)b->ws.n, (unsigned long long)b->pages_ws,
            (unsigned long long)b->ws_rec.n, b->t_eager_hold_end);
    fprintf(f, "\"eager_holdoff_us\": %.0f, \"eager_holdoff_total_s\": %.6f, ",
            b->holdoff_s * 1e6, b->holdoff_total_s);
    fputs("\"transport\": ", f);
    mr_json_string(f, b->addr.kind == BR_NET_TCP ? "tcp" : b->addr.kind == BR_NET_FD ? "fd"
                   : "unix");
    if (atomic_load(&b->pre)) {
        fprintf(f, ", \"preempt\": {\"requests_served\": %llu, \"requests_duplicate\": %llu, "
                "\"pages_on_request\": %llu, \"bytes_sent\": %llu, \"read_us\": ",
                (unsigned long long)b->prec.requests_served,
                (unsigned long long)b->prec.requests_duplicate,
                (unsigned long long)b->prec.pages_on_request,
                (unsigned long long)b->prec.bytes_sent);
        mr_samples_json(f, &b->pre_read);
        fputs(", \"send_us\": ", f);
        mr_samples_json(f, &b->pre_send);
        fputs("}, ", f);
    } else
        fputs(", \"preempt\": null, ", f);
    fputs("\"latency_us\": ", f);
    mr_samples_json(f, &b->lat);
    fputs("}\n", f);
}

/* ---- entry point -------------------------------------------------------- */

static void usage(FILE *f)
{
    fputs("usage: fastsnap-loader serve FILE [--offset N] --to unix:PATH|tcp:HOST:PORT|fd:N\n"
          "       [--preempt] [--json]\n"
          "       [--stats-file F] [--zero-pages requested|all] [--io-timeout S]\n"
          "       [--shut-timeout S] [--connect-timeout S] [--max-bandwidth MIB_S]\n"
          "       [--sndbuf BYTES] [--host-page-size ID=SIZE]... [--resume]\n"
          "       [--record-ws WSFILE] [--ws WSFILE [--ws-mode before-run|after-run]]\n"
          "       [--eager-delay S] [--eager-holdoff-us N] [--ready-fd N]\n"
          "   or: fastsnap-loader serve FILE [--offset N] [--ws WSFILE] --describe\n", f);
}

/* --describe: what the bridge would serve, for cross-checks against the
 * Python reader (byte ranges are absolute file offsets); with --ws, the
 * working set as read ("ws": [[block, page], ...] in file order). */
static void describe(const struct br_snap *s, const struct br_ws *ws, int has_ws, FILE *f)
{
    fputs("{\"machine\": ", f);
    mr_json_string(f, s->machine);
    fprintf(f, ", \"target_page_size\": %u, \"ram_section_id\": %u, \"ram_total\": %llu, "
            "\"early_setup\": [%llu, %llu], \"device_state\": [%llu, %llu], "
            "\"eof_offset\": %llu, \"vmdesc\": %s, \"blocks\": [", s->tps, s->ram_sid,
            (unsigned long long)s->ram_total, (unsigned long long)s->early_off,
            (unsigned long long)(s->early_off + s->early_len), (unsigned long long)s->dev_off,
            (unsigned long long)(s->dev_off + s->dev_len),
            (unsigned long long)(s->dev_off + s->dev_len), s->has_vmdesc ? "true" : "false");
    for (size_t i = 0; i < s->nblocks; i++) {
        const struct br_block *blk = &s->blocks[i];
        fprintf(f, "%s{\"id\": ", i ? ", " : "");
        mr_json_string(f, blk->id);
        fprintf(f, ", \"length\": %llu, \"bitmap_offset\": %llu, \"pages_offset\": %llu, "
                "\"pages_set\": %llu}", (unsigned long long)blk->length,
                (unsigned long long)blk->bitmap_offset, (unsigned long long)blk->pages_offset,
                (unsigned long long)blk->set_pages);
    }
    fputc(']', f);
    if (has_ws) {
        fputs(", \"ws\": [", f);
        for (uint64_t i = 0; i < ws->n; i++)
            fprintf(f, "%s[%u, %llu]", i ? ", " : "", ws->e[i].block,
                    (unsigned long long)ws->e[i].page);
        fputc(']', f);
    }
    fputs("}\n", f);
}

/* --host-page-size ID=SIZE onto the snapshot's blocks. */
static int apply_host_pages(struct bridge *b)
{
    for (size_t i = 0; i < b->nhps; i++) {
        struct br_block *blk = NULL;
        for (size_t j = 0; j < b->snap.nblocks; j++)
            if (b->snap.blocks[j].idlen == b->hps[i].idlen &&
                memcmp(b->snap.blocks[j].id, b->hps[i].id, b->hps[i].idlen) == 0)
                blk = &b->snap.blocks[j];
        if (!blk)
            return fail(b, E_USAGE, "--host-page-size %.*s: no such block in %s",
                        (int)b->hps[i].idlen, b->hps[i].id, b->path);
        if (b->hps[i].size < b->snap.tps || blk->length % b->hps[i].size)
            return fail(b, E_USAGE, "--host-page-size %.*s=%llu: not a multiple of the target "
                        "page or does not divide the block length %llu", (int)b->hps[i].idlen,
                        b->hps[i].id, (unsigned long long)b->hps[i].size,
                        (unsigned long long)blk->length);
        blk->host_pages = b->hps[i].size / b->snap.tps;
    }
    return 0;
}

static int run(struct bridge *b)
{
    if (br_snap_open(&b->snap, b->path, b->offset) < 0)
        return fail(b, b->snap.err.name, "%s: %s", b->path, b->snap.err.msg);
    if (apply_host_pages(b) < 0)
        return -1;
    if (b->ws_path && br_ws_load(&b->ws, &b->snap, b->ws_path, &b->err) < 0)
        return -1;
    if (b->record_ws_path && br_ws_record_init(&b->ws_rec, &b->snap, &b->err) < 0)
        return -1;
    if (b->describe_only) {
        describe(&b->snap, &b->ws, b->ws_path != NULL, stdout);
        return 0;
    }
    if (b->resume.active && br_resume_init(&b->resume, b->snap.nblocks, &b->err) < 0)
        return -1;
    if (b->ready_fd >= 0) {
        /* The caller may now tell the destination to listen: everything
         * before the connect is done.  A caller that went away is not an
         * error here; the connect decides. */
        ssize_t w;
        do
            w = write(b->ready_fd, "R", 1);
        while (w < 0 && errno == EINTR);
        close(b->ready_fd);
        b->ready_fd = -1;
    }
    if (b->resume.active)
        inject_hang(b, "resume-connect");
    if (connect_to(b) < 0 || (!b->resume.active && send_preamble(b) < 0))
        return -1;
    if (pthread_create(&b->rp_thread, NULL, rp_main, b) != 0)
        return fail(b, E_INTERNAL, "cannot start the return-path thread");
    b->rp_started = 1;
    if (b->resume.active ? resume_handshake(b) < 0
                         : send_setup(b) < 0 || (b->preempt && preempt_open(b) < 0) ||
                           (b->ws_before_run && send_ws(b) < 0) || send_package(b) < 0 ||
                           (b->eager_delay > 0 && hold_eager(b) < 0))
        return -1;
    if (send_pages(b) < 0 || send_end(b) < 0 || wait_shut(b) < 0)
        return -1;
    if (b->record_ws_path && br_ws_write(&b->ws_rec, &b->snap, b->record_ws_path, &b->err) < 0)
        return -1;
    return 0;
}

/* Options into b; 0, or -1 with an E_USAGE error (printed with the usage). */
static int parse_options(struct bridge *b, int argc, char **argv, int *json,
                         const char **stats_file)
{
    static const struct option opts[] = {
        {"offset", required_argument, NULL, 'o'}, {"to", required_argument, NULL, 't'},
        {"json", no_argument, NULL, 'j'}, {"stats-file", required_argument, NULL, 's'},
        {"zero-pages", required_argument, NULL, 'z'},
        {"io-timeout", required_argument, NULL, 'i'},
        {"shut-timeout", required_argument, NULL, 'S'},
        {"connect-timeout", required_argument, NULL, 'c'},
        {"ready-fd", required_argument, NULL, 'R'},
        {"max-bandwidth", required_argument, NULL, 'b'},
        {"describe", no_argument, NULL, 'd'},
        {"sndbuf", required_argument, NULL, 'B'},
        {"host-page-size", required_argument, NULL, 'H'},
        {"resume", no_argument, NULL, 'r'},
        {"ws", required_argument, NULL, 'w'}, {"record-ws", required_argument, NULL, 'W'},
        {"ws-mode", required_argument, NULL, 'm'},
        {"eager-delay", required_argument, NULL, 'e'},
        {"eager-holdoff-us", required_argument, NULL, 'O'},
        {"preempt", no_argument, NULL, 'P'},
        {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    /* Called as bridge_main(argc - 1, argv + 1) ("serve" in argv[0]); also
     * accept the whole command line ("fastsnap-loader serve ..."). */
    if (argc > 1 && strcmp(argv[1], "serve") == 0 && strcmp(argv[0], "serve") != 0) {
        argc--;
        argv++;
    }
    optind = 1;
    opterr = 0;
    int c, li = -1;
    uint64_t n;
    while ((c = getopt_long(argc, argv, "", opts, &li)) != -1) {
        int ok = 1;
        switch (c) {
        case 'o': ok = mr_parse_u64(optarg, &b->offset) == 0; break;
        case 't': b->to = optarg; break;
        case 'j': *json = 1; break;
        case 'd': b->describe_only = 1; break;
        case 'r': b->resume.active = 1; break;
        case 'P': b->preempt = 1; break;
        case 'B':
            ok = mr_parse_u64(optarg, &n) == 0 && n <= INT32_MAX;
            b->sndbuf = (int)n;
            break;
        case 's': *stats_file = optarg; break;
        case 'w': b->ws_path = optarg; break;
        case 'e': ok = mr_parse_double(optarg, 0, 3600, &b->eager_delay) == 0; break;
        case 'O':
            ok = mr_parse_u64(optarg, &n) == 0 && n <= 100000;
            b->holdoff_s = (double)n / 1e6;
            break;
        case 'W': b->record_ws_path = optarg; break;
        case 'm':
            ok = strcmp(optarg, "before-run") == 0 || strcmp(optarg, "after-run") == 0;
            b->ws_before_run = strcmp(optarg, "before-run") == 0;
            b->ws_mode_set = 1;
            break;
        case 'H': {
            const char *eq = strrchr(optarg, '=');
            ok = eq && eq != optarg && eq - optarg <= 255 && b->nhps < 16 &&
                 mr_parse_size(eq + 1, &n) == 0 && n >= 4096 && n <= (1ull << 30) &&
                 (n & (n - 1)) == 0;
            if (ok) {
                b->hps[b->nhps].id = optarg;
                b->hps[b->nhps].idlen = (size_t)(eq - optarg);
                b->hps[b->nhps++].size = n;
            }
            break;
        }
        case 'z':
            ok = strcmp(optarg, "all") == 0 || strcmp(optarg, "requested") == 0;
            b->zero_all = strcmp(optarg, "all") == 0;
            break;
        case 'i': ok = mr_parse_double(optarg, 1e-3, 1e6, &b->io_timeout) == 0; break;
        case 'S': ok = mr_parse_double(optarg, 1e-3, 1e6, &b->shut_timeout) == 0; break;
        case 'c': ok = mr_parse_double(optarg, 0, 1e6, &b->connect_timeout) == 0; break;
        case 'R':
            ok = mr_parse_u64(optarg, &n) == 0 && n >= 3 && n <= INT32_MAX;
            b->ready_fd = (int)n;
            break;
        case 'b':
            ok = mr_parse_double(optarg, 0, 1e9, &b->max_bandwidth) == 0;
            b->max_bandwidth *= 1 << 20;
            break;
        case 'h': b->help = 1; return 0;
        default:
            return fail(b, E_USAGE, "unknown option or missing value: %s", argv[optind - 1]);
        }
        if (!ok)
            return fail(b, E_USAGE, "bad value for --%s: %s", opts[li].name, optarg);
    }
    if (optind != argc - 1)
        return fail(b, E_USAGE, optind < argc ? "exactly one FILE expected" : "FILE missing");
    if (!b->to && !b->describe_only)
        return fail(b, E_USAGE, "--to unix:PATH|tcp:HOST:PORT|fd:N (or --describe) is required");
    if (b->to && br_net_parse(b->to, &b->addr, &b->err) < 0)
        return -1;
    if (b->preempt && b->to && !br_net_can_reconnect(&b->addr))
        return fail(b, E_USAGE, "--preempt needs a second connection: --to unix:PATH or "
                    "tcp:HOST:PORT, not %s", b->to);
    if (b->preempt && b->record_ws_path)
        return fail(b, E_USAGE, "--record-ws with --preempt is not supported: requests "
                    "answered on the preempt channel are not recorded");
    if (b->ws_mode_set && !b->ws_path)
        return fail(b, E_USAGE, "--ws-mode needs --ws WSFILE");
    b->path = argv[optind];
    if ((b->ws_path && !*b->ws_path) || (b->record_ws_path && !*b->record_ws_path))
        return fail(b, E_USAGE, "--ws and --record-ws need a file name");
    return 0;
}

/* Error line, JSON stats, stats file: what a finished run reports. */
static void report(struct bridge *b, int rc, int json, const char *stats_file)
{
    if (rc != 0)
        fprintf(stderr, "fastsnap-loader serve: %s: %s\n", b->err.name[0] ? b->err.name
                : E_INTERNAL, b->err.msg);
    if (json && !(b->describe_only && rc == 0))
        write_stats(b, stdout, rc);
    if (stats_file) {
        FILE *f = fopen(stats_file, "w");
        if (f) {
            write_stats(b, f, rc);
            fclose(f);
        } else {
            fprintf(stderr, "fastsnap-loader serve: %s: %s\n", stats_file, strerror(errno));
        }
    }
}

static void bridge_free(struct bridge *b)
{
    if (b->sock >= 0 && b->addr.kind != BR_NET_FD)
        close(b->sock);
    br_preempt_free(atomic_load(&b->pre));
    br_snap_close(&b->snap);
    free(b->out);
    free(b->stage);
    mr_samples_free(&b->lat);
    mr_samples_free(&b->pre_read);
    mr_samples_free(&b->pre_send);
    br_ws_free(&b->ws);
    br_ws_free(&b->ws_rec);
    free(b->q);
    br_resume_free(&b->resume);
    if (b->in_section)      /* a failure left a section open */
        pthread_mutex_unlock(&b->out_lock);
    pthread_mutex_destroy(&b->out_lock);
    pthread_mutex_destroy(&b->rp_lock);
    pthread_cond_destroy(&b->rp_cond);
    free(b);
}

/* The preempt channel's counters into the totals (its threads are done). */
static void preempt_merge(struct bridge *b)
{
    struct br_preempt_counts *c = &b->prec;
    br_preempt_take(atomic_load(&b->pre), c, &b->lat, &b->pre_read, &b->pre_send);
    b->requests_served += c->requests_served;
    b->requests_duplicate += c->requests_duplicate;
    b->pages_on_request += c->pages_on_request;
    b->pages_data += c->pages_data;
    b->pages_zero += c->pages_zero;
    b->bytes_sent += c->bytes_sent;
    b->file_bytes_read += c->file_bytes_read;
    b->double_sends += c->double_sends;
}

/* Exit status per mr_errors.h: 0 served, 2 unusable input, 1 run-time failure. */
int bridge_main(int argc, char **argv)
{
    struct bridge *b = calloc(1, sizeof(*b));
    if (!b) {
        fputs("fastsnap-loader serve: " E_INTERNAL ": out of memory\n", stderr);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &b->t_start);
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    b->wall_start = (double)wall.tv_sec + (double)wall.tv_nsec / 1e9;
    b->sock = -1;
    b->ready_fd = -1;
    b->snap.fd = -1;
    b->io_timeout = 60;
    b->shut_timeout = 30;
    b->connect_timeout = 10;
    pthread_mutex_init(&b->out_lock, NULL);
    pthread_mutex_init(&b->rp_lock, NULL);
    pthread_cond_init(&b->rp_cond, NULL);
    const char *stats_file = NULL;
    int json = 0;
    /* SIGUSR1 ends --eager-delay: blocked before any thread starts, taken
     * synchronously by hold_eager (no handler, no global state). */
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    if (parse_options(b, argc, argv, &json, &stats_file) < 0 || b->help) {
        if (b->help)    /* a usage error is one line, like every subcommand's */
            usage(stdout);
        else
            fprintf(stderr, "fastsnap-loader serve: %s: %s (--help shows the usage)\n",
                    b->err.name, b->err.msg);
        int rc = b->help ? 0 : 2;
        bridge_free(b);
        return rc;
    }
    b->out = malloc(OUT_CAP);
    b->stage = malloc((size_t)CHUNK_PAGES * 65536);
    int rc;
    if (!b->out || !b->stage)
        rc = fail(b, E_INTERNAL, "out of memory");
    else
        rc = run(b);
    rc = rc == 0 ? 0 : mr_error_exit(b->err.name[0] ? b->err.name : E_INTERNAL);
    if (b->sock >= 0)
        shutdown(b->sock, SHUT_RDWR);    /* unblocks the return-path reader */
    if (atomic_load(&b->pre))            /* ... and a preempt send it may be in */
        br_preempt_shutdown(atomic_load(&b->pre));
    if (b->rp_started)
        pthread_join(b->rp_thread, NULL);
    if (atomic_load(&b->pre))
        preempt_merge(b);
    report(b, rc, json, stats_file);
    bridge_free(b);
    return rc;
}
