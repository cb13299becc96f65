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

#include "mr_errors.h"

__attribute__((format(printf, 3, 4)))
static int fail(struct br_snap *s, const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mr_error_vset(&s->err, name, fmt, ap);
    va_end(ap);
    return -1;
}

/* Read exactly n bytes at off or fail with a precise message. */
static int rd(struct br_snap *s, uint64_t off, void *buf, size_t n, const char *what)
{
    if (off > s->file_size || n > s->file_size - off)
        return fail(s, E_TRUNCATED, "%s at offset %#llx (+%zu) is past the end of the file "
                    "(%llu bytes)", what, (unsigned long long)off, n,
                    (unsigned long long)s->file_size);
    ssize_t got = mr_pread_upto(s->fd, buf, n, off);
    if (got < 0)
        return fail(s, E_IO, "reading %s at %#llx: %s", what, (unsigned long long)off,
                    strerror(errno));
    if ((size_t)got < n)
        return fail(s, E_TRUNCATED, "reading %s at %#llx: file ended early", what,
                    (unsigned long long)(off + (uint64_t)got));
    return 0;
}

/* The configuration to regenerate, from what mr_parse validated: the machine
 * name, and the target-page-bits and uuid subsections verbatim (file order).
 * The capabilities subsection is dropped: a postcopy destination refuses
 * mapped-ram, and any other validated capability cannot be served. */
static int keep_config(struct br_snap *s)
{
    const mr_snapshot *ms = &s->ms;
    size_t len = strlen(ms->machine);
    if (len == 0 || len >= sizeof(s->machine))
        return fail(s, E_CONFIG, "machine name length %zu out of range", len);
    memcpy(s->machine, ms->machine, len + 1);
    s->machine_len = (uint32_t)len;
    for (unsigned i = 0; i < ms->ncaps; i++)
        if (strcmp(ms->caps[i], "mapped-ram") != 0)
            return fail(s, E_UNSUPPORTED, "capability %s cannot be served by a "
                        "postcopy source", ms->caps[i]);
    const mr_range *keep[2] = {NULL, NULL};
    if (ms->has_target_page_bits)
        keep[0] = &ms->sub_target_page_bits;
    if (ms->has_uuid)
        keep[1] = &ms->sub_uuid;
    if (keep[0] && keep[1] && keep[1]->start < keep[0]->start) {
        const mr_range *t = keep[0];
        keep[0] = keep[1];
        keep[1] = t;
    }
    for (int i = 0; i < 2; i++) {
        if (!keep[i])
            continue;
        size_t n = (size_t)(keep[i]->end - keep[i]->start);
        if (n > sizeof(s->cfg_keep) - s->cfg_keep_len)
            return fail(s, E_CONFIG, "configuration subsections too large");
        if (rd(s, keep[i]->start, s->cfg_keep + s->cfg_keep_len, n, "subsection") < 0)
            return -1;
        s->cfg_keep_len += n;
    }
    s->early_off = ms->early_setup.start;
    s->early_len = ms->early_setup.end - ms->early_setup.start;
    return 0;
}

static int load_block(struct br_snap *s, mr_core_block *core, struct br_block *blk)
{
    const mr_block *mb = core->meta;
    size_t idlen = strlen(mb->id);
    if (idlen == 0 || idlen > 255)
        return fail(s, E_BLOCK_ID, "block id of length %zu", idlen);
    memcpy(blk->id, mb->id, idlen + 1);
    blk->idlen = (uint8_t)idlen;
    blk->length = mb->used_length;
    blk->npages = mb->num_pages;
    blk->bitmap_offset = mb->bitmap_offset;
    blk->pages_offset = mb->pages_offset;
    if (mb->page_size != s->tps || blk->npages != blk->length / s->tps ||
        core->num_pages != blk->npages)
        return fail(s, E_INTERNAL, "block %s: parser geometry disagrees", blk->id);
    blk->core = core;
    blk->set_pages = mr_core_set_pages(core);
    blk->host_pages = 1;
    return 0;
}

int br_snap_open(struct br_snap *s, const char *path, uint64_t offset)
{
    memset(s, 0, sizeof(*s));
    mr_snapshot *ms = &s->ms;
    if (mr_open(path, &s->fd, &s->err) < 0 || mr_parse(s->fd, offset, NULL, ms, &s->err) < 0)
        return -1;
    s->file_size = ms->file_size;
    s->base = offset;
    s->tps = (uint32_t)ms->page_size;
    s->ram_sid = ms->ram_sid;
    s->ram_total = ms->total;
    s->dev_off = ms->dev_start;
    s->dev_len = ms->eof_offset - ms->dev_start;
    s->has_vmdesc = ms->has_vmdesc;
    if (ms->ignore_shared)
        return fail(s, E_UNSUPPORTED, "x-ignore-shared snapshots cannot be "
                    "served: postcopy is not compatible with ignore-shared");
    if (ms->nblocks == 0 || ms->nblocks > BR_MAX_BLOCKS || ms->ram_sid == 0)
        return fail(s, E_UNSUPPORTED, "%zu RAM blocks, RAM section id %u",
                    ms->nblocks, ms->ram_sid);
    if (keep_config(s) < 0)
        return -1;
    s->core = calloc(ms->nblocks, sizeof(*s->core));
    s->blocks = calloc(ms->nblocks, sizeof(*s->blocks));
    if (!s->core || !s->blocks)
        return fail(s, E_INTERNAL, "out of memory");
    if (mr_core_init(s->fd, ms, s->core) < 0)
        return fail(s, E_IO, "reading bitmaps: %s", strerror(errno));
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
