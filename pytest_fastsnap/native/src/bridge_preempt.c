/* Owns the bridge's postcopy-preempt channel (bridge_preempt.h): its socket,
 * output buffer, per-channel CONTINUE state, counters and latency samples.
 * Served from the return-path thread under its lock; the main thread reads
 * the error through an atomic flag (never waiting behind a blocked send) and
 * the counters once the return-path thread has ended. */
#define _GNU_SOURCE
#include "bridge_preempt.h"

#include "mr_errors.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PRE_CAP (256u << 10)
enum { PRE_ZERO = 0x02, PRE_PAGE = 0x08, PRE_CONTINUE = 0x20 };

struct br_preempt {
    struct br_snap *snap;
    int sock;
    struct timespec t0;
    pthread_mutex_t lock;
    uint8_t *out;
    size_t out_len;
    long last_block;
    struct br_preempt_counts c;
    mr_samples lat;
    /* per served request: the pages' pread()s (for a host page larger than
     * PRE_CAP, with the sends that make room), then the final send() */
    mr_samples read_lat, send_lat;
    mr_error err;               /* written once, before failed is set */
    atomic_int failed;          /* read without the lock: never waits for a send */
    atomic_int eof;             /* the main stream's EOF is going out */
};

static double since(const struct br_preempt *p)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - p->t0.tv_sec) + (double)(t.tv_nsec - p->t0.tv_nsec) / 1e9;
}

static void be64(uint8_t *o, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        o[i] = (uint8_t)v;
}

struct br_preempt *br_preempt_new(struct br_snap *snap, int sock, const struct timespec *t0,
                                  double io_timeout)
{
    struct br_preempt *p = calloc(1, sizeof *p);
    uint8_t *out = malloc(PRE_CAP);
    if (!p || !out) {
        free(p);
        free(out);
        close(sock);
        return NULL;
    }
    struct timeval tv = {.tv_sec = (time_t)io_timeout,
                         .tv_usec = (suseconds_t)((io_timeout - floor(io_timeout)) * 1e6)};
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    p->snap = snap;
    p->sock = sock;
    p->t0 = *t0;
    p->out = out;
    p->last_block = -1;
    pthread_mutex_init(&p->lock, NULL);
    return p;
}

static int flush(struct br_preempt *p)
{
    const uint8_t *b = p->out;
    size_t n = p->out_len;
    while (n) {
        ssize_t r = send(p->sock, b, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            p->out_len = 0;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return mr_error_set(&p->err, E_DEST_STALLED, "destination stopped reading "
                                    "the preempt channel");
            if (errno == EPIPE || errno == ECONNRESET)
                return mr_error_set(&p->err, E_DEST_GONE, "destination closed the preempt "
                                    "channel (%s; is its postcopy-preempt capability on?)",
                                    strerror(errno));
            return mr_error_set(&p->err, E_IO, "send on the preempt channel: %s",
                                strerror(errno));
        }
        b += r;
        n -= (size_t)r;
        p->c.bytes_sent += (uint64_t)r;
    }
    p->out_len = 0;
    return 0;
}

/* One record of page `page` of block bi, data read from the file (or ZERO). */
static int put_page(struct br_preempt *p, uint32_t bi, uint64_t page)
{
    const struct br_snap *s = p->snap;
    const struct br_block *blk = &s->blocks[bi];
    int data = mr_core_bit(blk->core, page);
    size_t need = 8 + 1 + 255 + (data ? s->tps : 1);
    if (p->out_len + need > PRE_CAP && flush(p) < 0)
        return -1;
    uint8_t *o = p->out + p->out_len;
    int cont = p->last_block == (long)bi;
    be64(o, page * s->tps | (data ? PRE_PAGE : PRE_ZERO) | (cont ? PRE_CONTINUE : 0));
    o += 8;
    if (!cont) {
        *o++ = blk->idlen;
        memcpy(o, blk->id, blk->idlen);
        o += blk->idlen;
    }
    if (data) {
        uint64_t off = blk->pages_offset + page * s->tps;
        size_t done = 0;
        while (done < s->tps) {
            ssize_t r = pread(s->fd, o + done, s->tps - done, (off_t)(off + done));
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0)
                return mr_error_set(&p->err, E_IO, "reading block %s page %llu: %s", blk->id,
                                    (unsigned long long)page, strerror(errno));
            if (r == 0)
                return mr_error_set(&p->err, E_FILE_SHORT, "snapshot file is short: block %s "
                                    "page %llu at offset %#llx (file truncated while "
                                    "serving?)", blk->id, (unsigned long long)page,
                                    (unsigned long long)(off + done));
            done += (size_t)r;
        }
        o += s->tps;
        p->c.file_bytes_read += s->tps;
        p->c.pages_data++;
    } else {
        *o++ = 0;
        p->c.pages_zero++;
    }
    p->out_len = (size_t)(o - p->out);
    p->last_block = (long)bi;
    if (mr_core_mark_loaded(blk->core, page))
        p->c.double_sends++;
    p->c.pages_on_request++;
    return 0;
}

/* 1 while the destination keeps the channel open; 0 (err set) once it closed
 * it: a destination without postcopy-preempt drops the connection. */
static int alive(struct br_preempt *p)
{
    uint8_t c;
    ssize_t r = recv(p->sock, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r > 0 || (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)))
        return 1;
    mr_error_set(&p->err, E_DEST_GONE, "the destination closed the preempt channel%s%s: is "
                 "its postcopy-preempt capability on? (without it QEMU logs \"Extra incoming "
                 "migration connection; ignoring\")", r < 0 ? ": " : "",
                 r < 0 ? strerror(errno) : "");
    return 0;
}

int br_preempt_check(struct br_preempt *p)
{
    pthread_mutex_lock(&p->lock);
    int ok = !atomic_load_explicit(&p->failed, memory_order_relaxed) && alive(p);
    if (!ok)
        atomic_store_explicit(&p->failed, 1, memory_order_release);
    pthread_mutex_unlock(&p->lock);
    return ok ? 0 : -1;
}

int br_preempt_serve(struct br_preempt *p, uint32_t bi, uint64_t start, uint32_t len,
                     double t_req)
{
    struct br_block *blk = &p->snap->blocks[bi];
    uint64_t tps = p->snap->tps, hp = blk->host_pages;
    uint64_t first = start / tps, n = ((uint64_t)len + tps - 1) / tps;
    int sent = 0;
    double t_read = 0;
    pthread_mutex_lock(&p->lock);
    if (atomic_load_explicit(&p->failed, memory_order_relaxed))
        goto failed;
    if (!alive(p)) {   /* never put a page on a channel nobody reads */
        if (!atomic_load(&p->eof))
            goto failed;
        /* After EOF the destination's cleanup closes the channel once no
         * requested page is outstanding: this request is a late duplicate. */
        p->err.name[0] = 0;
        p->c.requests_duplicate++;
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    for (uint64_t u = first - first % hp; u < first + n && u < blk->npages; u += hp) {
        /* A host page is owned by whoever claims its first target page
         * (the eager stream claims the same way). */
        if (!mr_core_claim(blk->core, u))
            continue;
        for (uint64_t q = u + 1; q < u + hp && q < blk->npages; q++)
            mr_core_claim(blk->core, q);
        double t0 = since(p);
        for (uint64_t q = u; q < u + hp && q < blk->npages; q++)
            if (put_page(p, bi, q) < 0)
                goto failed;
        t_read += since(p) - t0;
        sent = 1;
    }
    if (sent) {
        double t_flush = since(p);
        if (flush(p) < 0)
            goto failed;
        double t_done = since(p), d = t_done - t_req;
        mr_samples_add(&p->lat, d > 0 ? (uint64_t)(d * 1e9) : 0);
        mr_samples_add(&p->read_lat, (uint64_t)(t_read * 1e9));
        mr_samples_add(&p->send_lat, (uint64_t)((t_done - t_flush) * 1e9));
        p->c.requests_served++;
    } else {
        p->c.requests_duplicate++;
    }
    pthread_mutex_unlock(&p->lock);
    return sent;
failed:
    atomic_store_explicit(&p->failed, 1, memory_order_release);
    pthread_mutex_unlock(&p->lock);
    return -1;
}

void br_preempt_eof(struct br_preempt *p)
{
    atomic_store(&p->eof, 1);
}

void br_preempt_shutdown(struct br_preempt *p)
{
    if (p->sock >= 0)
        shutdown(p->sock, SHUT_RDWR);
}

const mr_error *br_preempt_error(struct br_preempt *p)
{
    return atomic_load_explicit(&p->failed, memory_order_acquire) ? &p->err : NULL;
}

void br_preempt_take(struct br_preempt *p, struct br_preempt_counts *c, mr_samples *lat,
                     mr_samples *read_lat, mr_samples *send_lat)
{
    pthread_mutex_lock(&p->lock);
    *c = p->c;
    mr_samples_merge(lat, &p->lat);
    mr_samples_merge(read_lat, &p->read_lat);
    mr_samples_merge(send_lat, &p->send_lat);
    pthread_mutex_unlock(&p->lock);
}

void br_preempt_free(struct br_preempt *p)
{
    if (!p)
        return;
    close(p->sock);
    mr_samples_free(&p->lat);
    mr_samples_free(&p->read_lat);
    mr_samples_free(&p->send_lat);
    free(p->out);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
