/* What the bridge needs from a mapped-ram snapshot, on top of the strict
 * parser (mr_format.c): mr_parse() validates the whole framing and gives
 * the RAM section id, the block list with every offset, and the device-state
 * byte range [dev_start, eof).  Here the bridge adds what only it needs:
 *
 * - the configuration subsections worth replaying (target-page-bits, uuid;
 *   capabilities are dropped: a postcopy destination refuses mapped-ram),
 *   and where the configuration ends, so early_setup sections
 *   [config end, RAM START) can be replayed verbatim;
 * - each block's file bitmap in memory, and a sent bitmap.
 *
 * Files a postcopy destination cannot take (x-ignore-shared) are refused.
 */
#define _GNU_SOURCE
#include "bridge_snap.h"

#include "mr_format.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


static int fail(struct br_snap *s, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(struct br_snap *s, const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, sizeof(s->err), fmt, ap);
    va_end(ap);
    s->err_name = name;
    return -1;
}

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Read exactly n bytes at off or fail with a precise message. */
static int rd(struct br_snap *s, uint64_t off, void *buf, size_t n, const char *what)
{
    if (off > s->file_size || n > s->file_size - off)
        return fail(s, "truncated", "%s at offset %#llx (+%zu) is past the end of the file "
                    "(%llu bytes)", what, (unsigned long long)off, n,
                    (unsigned long long)s->file_size);
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(s->fd, (char *)buf + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail(s, "io-error", "reading %s at %#llx: %s", what,
                        (unsigned long long)(off + done), strerror(errno));
        if (r == 0)
            return fail(s, "truncated", "reading %s at %#llx: file ended early", what,
                        (unsigned long long)(off + done));
        done += (size_t)r;
    }
    return 0;
}

static int parse_config(struct br_snap *s, uint64_t *pos)
{
    uint8_t h[13];
    if (rd(s, *pos, h, sizeof h, "stream header") < 0)
        return -1;
    if (be32(h) != 0x5145564du)
        return fail(s, "bad-magic", "not a migration stream (magic %#x)", be32(h));
    if (be32(h + 4) != 3)
        return fail(s, "bad-version", "unsupported stream version %u", be32(h + 4));
    if (h[8] != 0x07)
        return fail(s, "no-configuration", "expected configuration record 0x07, got %#x", h[8]);
    uint32_t len = be32(h + 9);
    if (len == 0 || len >= sizeof(s->machine))
        return fail(s, "bad-machine-name", "machine name length %u out of range", len);
    s->machine_len = len;
    if (rd(s, *pos + 13, s->machine, len, "machine name") < 0)
        return -1;
    s->machine[len] = 0;
    *pos += 13 + len;
    s->tps = 4096;
    for (;;) {
        uint8_t t;
        if (rd(s, *pos, &t, 1, "configuration") < 0)
            return -1;
        if (t != 0x05)
            break;
        uint8_t nl;
        char name[256];
        uint8_t ver[4];
        uint64_t start = *pos;
        if (rd(s, *pos + 1, &nl, 1, "subsection name") < 0 ||
            rd(s, *pos + 2, name, nl, "subsection name") < 0 ||
            rd(s, *pos + 2 + nl, ver, 4, "subsection version") < 0)
            return -1;
        name[nl] = 0;
        uint64_t p = *pos + 2 + nl + 4;
        if (strcmp(name, "configuration/target-page-bits") == 0) {
            uint8_t b[4];
            if (rd(s, p, b, 4, "target-page-bits") < 0)
                return -1;
            uint32_t bits = be32(b);
            if (bits < 10 || bits > 16)
                return fail(s, "bad-page-bits", "target-page-bits %u out of range", bits);
            s->tps = 1u << bits;
            p += 4;
        } else if (strcmp(name, "configuration/uuid") == 0) {
            p += 16;
        } else if (strcmp(name, "configuration/capabilities") == 0) {
            uint8_t b[4];
            if (rd(s, p, b, 4, "capability count") < 0)
                return -1;
            uint32_t n = be32(b);
            if (n > 64)
                return fail(s, "bad-capabilities", "%u capabilities listed", n);
            p += 4;
            for (uint32_t i = 0; i < n; i++) {
                uint8_t cl;
                char cap[256];
                if (rd(s, p, &cl, 1, "capability") < 0 || rd(s, p + 1, cap, cl, "capability") < 0)
                    return -1;
                cap[cl] = 0;
                p += 1 + cl;
                if (strcmp(cap, "mapped-ram") == 0)
                    s->has_capabilities_mapped_ram = 1;
                else if (strcmp(cap, "x-ignore-shared") == 0)
                    return fail(s, "unsupported-capability", "x-ignore-shared snapshots "
                                "cannot be served: postcopy is not compatible with ignore-shared");
                else
                    return fail(s, "unsupported-capability", "unknown capability %s", cap);
            }
            *pos = p;
            continue; /* dropped: a postcopy destination refuses mapped-ram */
        } else {
            return fail(s, "unknown-subsection", "unknown configuration subsection %s", name);
        }
        size_t keep = (size_t)(p - start);
        if (keep > sizeof(s->cfg_keep) - s->cfg_keep_len)
            return fail(s, "bad-configuration", "configuration subsections too large");
        if (rd(s, start, s->cfg_keep + s->cfg_keep_len, keep, "subsection") < 0)
            return -1;
        s->cfg_keep_len += keep;
        *pos = p;
    }
    if (!s->has_capabilities_mapped_ram)
        return fail(s, "not-mapped-ram", "configuration does not list the mapped-ram capability");
    return 0;
}

static int load_block(struct br_snap *s, mr_core_block *core, struct br_block *blk)
{
    const mr_block *mb = core->meta;
    size_t idlen = strlen(mb->id);
    if (idlen == 0 || idlen > 255)
        return fail(s, "bad-block-id", "block id of length %zu", idlen);
    memcpy(blk->id, mb->id, idlen + 1);
    blk->idlen = (uint8_t)idlen;
    blk->length = mb->used_length;
    blk->npages = mb->num_pages;
    blk->bitmap_offset = mb->bitmap_offset;
    blk->pages_offset = mb->pages_offset;
    if (mb->page_size != s->tps || blk->npages != blk->length / s->tps ||
        core->num_pages != blk->npages)
        return fail(s, "internal", "block %s: parser geometry disagrees", blk->id);
    blk->core = core;
    blk->file_bitmap = core->file_bits;
    blk->sent = core->claimed;
    for (uint64_t w = 0; w < core->nwords; w++)
        blk->set_pages += (uint64_t)__builtin_popcountll(blk->file_bitmap[w]);
    return 0;
}

int br_snap_open(struct br_snap *s, const char *path, uint64_t offset)
{
    memset(s, 0, sizeof(*s));
    s->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (s->fd < 0)
        return fail(s, "open-failed", "%s: %s", path, strerror(errno));
    mr_snapshot *ms = &s->ms;
    mr_error me;
    int rc = mr_parse(s->fd, offset, NULL, ms, &me);
    if (rc != MR_OK) {
        s->internal = rc == MR_INTERNAL;
        snprintf(s->err_name_buf, sizeof(s->err_name_buf), "%s", me.name);
        s->err_name = s->err_name_buf;
        snprintf(s->err, sizeof(s->err), "%s", me.msg);
        return -1;
    }
    s->file_size = ms->file_size;
    s->base = offset;
    s->tps = (uint32_t)ms->page_size;
    s->ram_sid = ms->ram_sid;
    s->ram_total = ms->total;
    s->dev_off = ms->dev_start;
    s->dev_len = ms->eof_offset - ms->dev_start;
    s->has_vmdesc = ms->has_vmdesc;
    uint64_t pos = offset;
    if (ms->ignore_shared)
        return fail(s, "unsupported-capability", "x-ignore-shared snapshots cannot be "
                    "served: postcopy is not compatible with ignore-shared");
    if (ms->nblocks == 0 || ms->nblocks > BR_MAX_BLOCKS || ms->ram_sid == 0)
        return fail(s, "unsupported-snapshot", "%zu RAM blocks, RAM section id %u",
                    ms->nblocks, ms->ram_sid);
    if (parse_config(s, &pos) < 0)
        return -1;
    if (pos > ms->ram_start || strcmp(s->machine, ms->machine) != 0)
        return fail(s, "internal", "configuration end %#llx past RAM START %#llx",
                    (unsigned long long)pos, (unsigned long long)ms->ram_start);
    s->early_off = pos;
    s->early_len = ms->ram_start - pos;
    s->core = calloc(ms->nblocks, sizeof(*s->core));
    s->blocks = calloc(ms->nblocks, sizeof(*s->blocks));
    if (!s->core || !s->blocks)
        return fail(s, "oom", "out of memory");
    if (mr_core_init(s->fd, ms, s->core) < 0)
        return fail(s, "io-error", "reading bitmaps: %s", strerror(errno));
    for (size_t i = 0; i < ms->nblocks; i++) {
        if (load_block(s, &s->core[i], &s->blocks[i]) < 0)
            return -1;
        s->nblocks = i + 1;
    }
    return 0;
}

void br_snap_close(struct br_snap *s)
{
    if (s->core)
        mr_core_free(s->core, s->ms.nblocks);
    free(s->core);
    free(s->blocks);
    mr_snapshot_free(&s->ms);   /* safe on a zeroed or failed parse */
    if (s->fd >= 0)
        close(s->fd);
    s->core = NULL;
    s->blocks = NULL;
    s->nblocks = 0;
    s->fd = -1;
}
