/* Owns the bridge's working-set files: their format (bridge_ws.h), the
 * hostile-input-safe reader behind `serve --ws FILE`, and the recorder
 * behind `serve --record-ws FILE`.  The bridge (bridge.c) decides when the
 * listed pages are sent; this file only says which, in which order. */
#define _GNU_SOURCE
#include "bridge_ws.h"

#include "mr_errors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char WS_MAGIC[8] = {'F', 'S', 'N', 'A', 'P', 'W', 'S', '1'};
#define WS_HEADER 24u
#define WS_ENTRY 12u
#define WS_HASH 8u

uint64_t br_ws_hash(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
    put_le32(p, (uint32_t)v);
    put_le32(p + 4, (uint32_t)(v >> 32));
}

static uint64_t total_pages(const struct br_snap *snap)
{
    uint64_t n = 0;
    for (size_t i = 0; i < snap->nblocks; i++)
        n += snap->blocks[i].npages;
    return n;
}

static size_t block_list_size(const struct br_snap *snap)
{
    size_t n = 0;
    for (size_t i = 0; i < snap->nblocks; i++)
        n += 1u + snap->blocks[i].idlen + 8u;
    return n;
}

static uint64_t **seen_alloc(const struct br_snap *snap)
{
    uint64_t **seen = calloc(snap->nblocks, sizeof(*seen));
    if (!seen)
        return NULL;
    for (size_t i = 0; i < snap->nblocks; i++) {
        seen[i] = calloc((size_t)(snap->blocks[i].npages / 64 + 1), sizeof(uint64_t));
        if (!seen[i]) {
            for (size_t j = 0; j < i; j++)
                free(seen[j]);
            free(seen);
            return NULL;
        }
    }
    return seen;
}

/* 1 if the page was already marked; marks it. */
static int seen_mark(uint64_t **seen, uint32_t block, uint64_t page)
{
    uint64_t mask = 1ull << (page % 64);
    int was = (seen[block][page / 64] & mask) != 0;
    seen[block][page / 64] |= mask;
    return was;
}

/* Read the whole file (size already bounded by the caller) into *buf. */
static int read_file(int fd, uint8_t *buf, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, buf + done, n - done, (off_t)done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

static int ws_parse(struct br_ws *ws, const struct br_snap *snap, const char *path,
                    const uint8_t *buf, size_t size, mr_error *err)
{
    if (size < WS_HEADER + WS_HASH)
        return mr_error_set(err, E_WS, "%s: %zu bytes, shorter than the %u-byte header and "
                            "hash of a working-set file", path, size, WS_HEADER + WS_HASH);
    if (memcmp(buf, WS_MAGIC, sizeof WS_MAGIC) != 0)
        return mr_error_set(err, E_WS, "%s: not a working-set file (magic at offset 0 is not "
                            "FSNAPWS1)", path);
    uint32_t tps = le32(buf + 8), nblocks = le32(buf + 12);
    uint64_t n = le64(buf + 16), pages = total_pages(snap);
    if (tps != snap->tps)
        return mr_error_set(err, E_WS, "%s: recorded with target page size %u, the snapshot "
                            "has %u (offset 8)", path, tps, snap->tps);
    if (nblocks != snap->nblocks)
        return mr_error_set(err, E_WS, "%s: recorded for %u RAM blocks, the snapshot has %zu "
                            "(offset 12)", path, nblocks, snap->nblocks);
    if (n > pages)
        return mr_error_set(err, E_WS, "%s: %llu entries, more than the snapshot's %llu pages "
                            "(offset 16)", path, (unsigned long long)n,
                            (unsigned long long)pages);
    size_t want = WS_HEADER + block_list_size(snap) + (size_t)n * WS_ENTRY + WS_HASH;
    if (size != want)
        return mr_error_set(err, E_WS, "%s: %zu bytes, but its header and this snapshot's "
                            "block list make %zu (truncated or trailing bytes)", path, size,
                            want);
    uint64_t hash = le64(buf + size - WS_HASH);
    if (hash != br_ws_hash(buf, size - WS_HASH))
        return mr_error_set(err, E_WS, "%s: hash at offset %zu does not match the contents "
                            "(corrupt file)", path, size - WS_HASH);
    size_t off = WS_HEADER;
    for (size_t i = 0; i < snap->nblocks; i++) {
        const struct br_block *blk = &snap->blocks[i];
        uint8_t len = buf[off];
        if (len != blk->idlen || memcmp(buf + off + 1, blk->id, len) != 0 ||
            le64(buf + off + 1 + len) != blk->length)
            return mr_error_set(err, E_WS, "%s: block %zu at offset %zu is not the snapshot's "
                                "%s of %llu bytes (recorded on another snapshot?)", path, i,
                                off, blk->id, (unsigned long long)blk->length);
        off += 1u + len + 8u;
    }
    ws->e = malloc((size_t)(n ? n : 1) * sizeof(*ws->e));
    uint64_t **seen = seen_alloc(snap);
    if (!ws->e || !seen) {
        if (seen)
            for (size_t i = 0; i < snap->nblocks; i++)
                free(seen[i]);
        free(seen);
        return mr_error_set(err, E_INTERNAL, "out of memory for %llu working-set entries",
                            (unsigned long long)n);
    }
    int rc = 0;
    for (uint64_t i = 0; i < n && rc == 0; i++, off += WS_ENTRY) {
        uint32_t block = le32(buf + off);
        uint64_t page = le64(buf + off + 4);
        if (block >= snap->nblocks)
            rc = mr_error_set(err, E_WS, "%s: entry %llu at offset %zu names block %u of %zu",
                              path, (unsigned long long)i, off, block, snap->nblocks);
        else if (page >= snap->blocks[block].npages)
            rc = mr_error_set(err, E_WS, "%s: entry %llu at offset %zu names page %llu of "
                              "block %s, which has %llu", path, (unsigned long long)i, off,
                              (unsigned long long)page, snap->blocks[block].id,
                              (unsigned long long)snap->blocks[block].npages);
        else if (seen_mark(seen, block, page))
            rc = mr_error_set(err, E_WS, "%s: entry %llu at offset %zu repeats page %llu of "
                              "block %s", path, (unsigned long long)i, off,
                              (unsigned long long)page, snap->blocks[block].id);
        else
            ws->e[ws->n++] = (struct br_ws_entry){.block = block, .page = page};
    }
    for (size_t i = 0; i < snap->nblocks; i++)
        free(seen[i]);
    free(seen);
    return rc;
}

int br_ws_load(struct br_ws *ws, const struct br_snap *snap, const char *path, mr_error *err)
{
    memset(ws, 0, sizeof(*ws));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mr_error_set(err, E_OPEN, "--ws %s: %s", path, strerror(errno));
    struct stat st;
    int rc = -1;
    uint8_t *buf = NULL;
    size_t bound = WS_HEADER + block_list_size(snap) + (size_t)total_pages(snap) * WS_ENTRY +
                   WS_HASH;
    if (fstat(fd, &st) < 0)
        mr_error_set(err, E_OPEN, "--ws %s: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        mr_error_set(err, E_WS, "--ws %s: not a regular file", path);
    else if ((uint64_t)st.st_size > bound)
        mr_error_set(err, E_WS, "%s: %lld bytes, larger than any working set of this snapshot "
                     "(%zu)", path, (long long)st.st_size, bound);
    else if (!(buf = malloc(st.st_size ? (size_t)st.st_size : 1)))
        mr_error_set(err, E_INTERNAL, "out of memory reading %s", path);
    else if (read_file(fd, buf, (size_t)st.st_size) < 0)
        mr_error_set(err, E_WS, "%s: cannot read %lld bytes (file changed while read?)", path,
                     (long long)st.st_size);
    else
        rc = ws_parse(ws, snap, path, buf, (size_t)st.st_size, err);
    free(buf);
    close(fd);
    if (rc < 0)
        br_ws_free(ws);
    return rc;
}

int br_ws_record_init(struct br_ws *ws, const struct br_snap *snap, mr_error *err)
{
    memset(ws, 0, sizeof(*ws));
    ws->cap = total_pages(snap);
    ws->nblocks = snap->nblocks;
    ws->seen = seen_alloc(snap);
    ws->e = malloc((size_t)(ws->cap ? ws->cap : 1) * sizeof(*ws->e));
    if (!ws->seen || !ws->e) {
        br_ws_free(ws);
        return mr_error_set(err, E_INTERNAL, "out of memory for a working set of %llu pages",
                            (unsigned long long)ws->cap);
    }
    return 0;
}

void br_ws_note(struct br_ws *ws, uint32_t block, uint64_t page, uint64_t count)
{
    for (uint64_t p = page; p < page + count; p++)
        if (!seen_mark(ws->seen, block, p) && ws->n < ws->cap)
            ws->e[ws->n++] = (struct br_ws_entry){.block = block, .page = p};
}

int br_ws_write(const struct br_ws *ws, const struct br_snap *snap, const char *path,
                mr_error *err)
{
    size_t size = WS_HEADER + block_list_size(snap) + (size_t)ws->n * WS_ENTRY + WS_HASH;
    uint8_t *buf = malloc(size);
    if (!buf)
        return mr_error_set(err, E_INTERNAL, "out of memory writing %s", path);
    memcpy(buf, WS_MAGIC, sizeof WS_MAGIC);
    put_le32(buf + 8, snap->tps);
    put_le32(buf + 12, (uint32_t)snap->nblocks);
    put_le64(buf + 16, ws->n);
    size_t off = WS_HEADER;
    for (size_t i = 0; i < snap->nblocks; i++) {
        const struct br_block *blk = &snap->blocks[i];
        buf[off] = blk->idlen;
        memcpy(buf + off + 1, blk->id, blk->idlen);
        put_le64(buf + off + 1 + blk->idlen, blk->length);
        off += 1u + blk->idlen + 8u;
    }
    for (uint64_t i = 0; i < ws->n; i++, off += WS_ENTRY) {
        put_le32(buf + off, ws->e[i].block);
        put_le64(buf + off + 4, ws->e[i].page);
    }
    put_le64(buf + off, br_ws_hash(buf, off));
    char tmp[4096];
    int rc = -1;
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp) {
        mr_error_set(err, E_USAGE, "--record-ws path too long: %s", path);
    } else {
        int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        int e = fd < 0 ? errno : 0;
        size_t done = 0;
        while (!e && done < size) {
            ssize_t r = write(fd, buf + done, size - done);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                e = r < 0 ? errno : EIO;
            else
                done += (size_t)r;
        }
        if (!e && fsync(fd) < 0)
            e = errno;
        if (fd >= 0 && close(fd) < 0 && !e)
            e = errno;
        if (!e && rename(tmp, path) < 0)
            e = errno;
        if (e) {
            unlink(tmp);
            mr_error_set(err, E_IO, "--record-ws %s: %s", path, strerror(e));
        } else {
            rc = 0;
        }
    }
    free(buf);
    return rc;
}

void br_ws_free(struct br_ws *ws)
{
    if (ws->seen) {
        for (size_t i = 0; i < ws->nblocks; i++)
            free(ws->seen[i]);
        free(ws->seen);
    }
    free(ws->e);
    memset(ws, 0, sizeof(*ws));
}
