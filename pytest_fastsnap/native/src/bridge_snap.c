/* Framing-only parse of a mapped-ram snapshot for the bridge.
 *
 * Layout (reference/mapped-ram-format.md): header + configuration record,
 * optional early_setup FULL sections, the `ram` START with one
 * MappedRamHeader per block (the stream jumps over each page region), empty
 * PART/END `ram` sections and SWITCHOVER_START, then the device-state FULL
 * sections up to EOF, then an optional VMDESCRIPTION.  The device state is
 * cut out as an opaque run: from the end of the RAM END footer to the EOF
 * byte found with the backward anchor `7e be32 00 06 be32 len`.
 */
#define _GNU_SOURCE
#include "bridge_snap.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define EARLY_SEARCH_MAX (16u << 20)   /* early_setup sections are small */
#define TAIL_MAX (256u << 20)          /* device state + vmdesc */

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

static uint64_t be64(const uint8_t *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
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

static const uint8_t ram_tail[12] = {3, 'r', 'a', 'm', 0, 0, 0, 0, 0, 0, 0, 4};

static int find_ram_start(struct br_snap *s, uint64_t pos, uint64_t *start)
{
    /* Usually right here; early_setup sections (virtio-mem) are small, so
     * look in a 64 KiB window first and only then up to EARLY_SEARCH_MAX. */
    uint64_t avail = s->file_size - pos;
    for (size_t window = 64u << 10;; window = EARLY_SEARCH_MAX) {
        size_t n = avail < window ? (size_t)avail : window;
        uint8_t *buf = malloc(n ? n : 1);
        if (!buf)
            return fail(s, "oom", "out of memory");
        if (rd(s, pos, buf, n, "early sections") < 0) {
            free(buf);
            return -1;
        }
        for (size_t i = 0; i + 17 <= n; i++) {
            if (buf[i] == 0x01 && memcmp(buf + i + 5, ram_tail, sizeof ram_tail) == 0) {
                *start = pos + i;
                s->ram_sid = be32(buf + i + 1);
                free(buf);
                return 0;
            }
        }
        free(buf);
        if (n < window || window == EARLY_SEARCH_MAX)
            return fail(s, "no-ram-section", "no `ram` START section (version 4) within %zu "
                        "bytes of the configuration", n);
    }
}

static int parse_ram(struct br_snap *s, uint64_t *pos)
{
    uint8_t b[8];
    if (s->ram_sid == 0)
        return fail(s, "bad-section-id", "`ram` section id 0");
    *pos += 17;
    if (rd(s, *pos, b, 8, "RAM total") < 0)
        return -1;
    uint64_t v = be64(b);
    if ((v & (s->tps - 1)) != 0x4)
        return fail(s, "bad-ram-start", "RAM START flags %#llx, expected MEM_SIZE",
                    (unsigned long long)(v & (s->tps - 1)));
    s->ram_total = v & ~(uint64_t)(s->tps - 1);
    *pos += 8;
    s->blocks = calloc(BR_MAX_BLOCKS, sizeof(*s->blocks));
    if (!s->blocks)
        return fail(s, "oom", "out of memory");
    uint64_t sum = 0;
    while (sum < s->ram_total) {
        if (s->nblocks == BR_MAX_BLOCKS)
            return fail(s, "too-many-blocks", "more than %d RAM blocks", BR_MAX_BLOCKS);
        struct br_block *blk = &s->blocks[s->nblocks];
        uint8_t hdr[8 + 28];
        if (rd(s, *pos, &blk->idlen, 1, "block id") < 0 ||
            rd(s, *pos + 1, blk->id, blk->idlen, "block id") < 0)
            return -1;
        if (blk->idlen == 0)
            return fail(s, "bad-block-id", "empty block id at %#llx", (unsigned long long)*pos);
        blk->id[blk->idlen] = 0;
        if (rd(s, *pos + 1 + blk->idlen, hdr, sizeof hdr, "block header") < 0)
            return -1;
        blk->length = be64(hdr);
        uint32_t version = be32(hdr + 8);
        uint64_t page_size = be64(hdr + 12);
        blk->bitmap_offset = be64(hdr + 20);
        blk->pages_offset = be64(hdr + 28);
        if (version != 1)
            return fail(s, "bad-header-version", "block %s: MappedRamHeader version %u",
                        blk->id, version);
        if (page_size != s->tps)
            return fail(s, "bad-page-size", "block %s: page_size %llu, target page size %u",
                        blk->id, (unsigned long long)page_size, s->tps);
        if (blk->length == 0 || blk->length % s->tps || blk->length > s->ram_total - sum)
            return fail(s, "bad-block-length", "block %s: length %#llx", blk->id,
                        (unsigned long long)blk->length);
        blk->npages = blk->length / s->tps;
        uint64_t words = (blk->npages + 63) / 64;
        if (blk->pages_offset % s->tps ||
            blk->pages_offset > s->file_size || blk->length > s->file_size - blk->pages_offset)
            return fail(s, "bad-pages-offset", "block %s: pages_offset %#llx", blk->id,
                        (unsigned long long)blk->pages_offset);
        if (blk->bitmap_offset > s->file_size || words * 8 > s->file_size - blk->bitmap_offset)
            return fail(s, "bad-bitmap-offset", "block %s: bitmap_offset %#llx", blk->id,
                        (unsigned long long)blk->bitmap_offset);
        blk->file_bitmap = calloc(words, 8);
        blk->sent = calloc(words, sizeof(*blk->sent));
        if (!blk->file_bitmap || !blk->sent)
            return fail(s, "oom", "out of memory");
        if (rd(s, blk->bitmap_offset, blk->file_bitmap, words * 8, "bitmap") < 0)
            return -1;
        if (blk->npages % 64)   /* bits past the end mean nothing */
            blk->file_bitmap[words - 1] &= (UINT64_C(1) << (blk->npages % 64)) - 1;
        for (uint64_t w = 0; w < words; w++)
            blk->set_pages += (uint64_t)__builtin_popcountll(blk->file_bitmap[w]);
        for (size_t j = 0; j < s->nblocks; j++)
            if (strcmp(s->blocks[j].id, blk->id) == 0)
                return fail(s, "duplicate-block", "block %s listed twice", blk->id);
        sum += blk->length;
        s->nblocks++;
        *pos = blk->pages_offset + blk->length;
    }
    uint8_t tail[13];
    if (rd(s, *pos, tail, sizeof tail, "RAM START end") < 0)
        return -1;
    if (be64(tail) != 0x10 || tail[8] != 0x7e || be32(tail + 9) != s->ram_sid)
        return fail(s, "bad-ram-start", "RAM START does not end in EOS and footer at %#llx",
                    (unsigned long long)*pos);
    *pos += 13;
    /* Empty PART/END `ram` sections and SWITCHOVER_START up to the RAM END. */
    for (;;) {
        uint8_t r[18];
        if (rd(s, *pos, r, 5, "RAM record") < 0)
            return -1;
        if (r[0] == 0x08 && r[1] == 0 && r[2] == 0x0b && r[3] == 0 && r[4] == 0) {
            *pos += 5;
            continue;
        }
        if ((r[0] == 0x02 || r[0] == 0x03) && be32(r + 1) == s->ram_sid) {
            if (rd(s, *pos, r, 18, "RAM record") < 0)
                return -1;
            if (be64(r + 5) != 0x10 || r[13] != 0x7e || be32(r + 14) != s->ram_sid)
                return fail(s, "unexpected-ram-payload", "`ram` %s section at %#llx carries "
                            "data (only EOS expected in a mapped-ram file)",
                            r[0] == 2 ? "PART" : "END", (unsigned long long)*pos);
            *pos += 18;
            if (r[0] == 0x03)
                return 0;
            continue;
        }
        return fail(s, "unsupported-section", "record %#x (section %u) at %#llx before the "
                    "`ram` END: another iterative handler (dirty-bitmap, VFIO?) is not "
                    "supported", r[0], be32(r + 1), (unsigned long long)*pos);
    }
}

static int find_device_state(struct br_snap *s, uint64_t pos)
{
    uint64_t avail = s->file_size - pos;
    if (avail > TAIL_MAX)
        return fail(s, "tail-too-large", "%llu bytes after the RAM section (limit %u)",
                    (unsigned long long)avail, TAIL_MAX);
    size_t n = (size_t)avail;
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf)
        return fail(s, "oom", "out of memory");
    if (rd(s, pos, buf, n, "device state") < 0) {
        free(buf);
        return -1;
    }
    int found = 0;
    for (size_t i = n >= 11 ? n - 11 : 0; n >= 11; i--) {
        if (buf[i] == 0x7e && buf[i + 5] == 0x00 && buf[i + 6] == 0x06 &&
            be32(buf + i + 7) == n - (i + 11)) {
            s->dev_len = i + 5;
            s->has_vmdesc = 1;
            found = 1;
            break;
        }
        if (i == 0)
            break;
    }
    if (!found && n >= 6 && buf[n - 1] == 0x00 && buf[n - 6] == 0x7e) {
        s->dev_len = n - 1;
        found = 1;
    }
    if (!found && n == 1 && buf[0] == 0x00) {
        s->dev_len = 0;
        found = 1;
    }
    free(buf);
    if (!found)
        return fail(s, "no-eof", "cannot locate the EOF after the device state "
                    "(file truncated or trailing bytes?)");
    s->dev_off = pos;
    return 0;
}

int br_snap_open(struct br_snap *s, const char *path, uint64_t offset)
{
    memset(s, 0, sizeof(*s));
    s->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (s->fd < 0)
        return fail(s, "open-failed", "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(s->fd, &st) < 0)
        return fail(s, "io-error", "%s: %s", path, strerror(errno));
    s->file_size = (uint64_t)st.st_size;
    s->base = offset;
    if (offset > s->file_size)
        return fail(s, "bad-offset", "offset %llu past the end of %s",
                    (unsigned long long)offset, path);
    uint64_t pos = offset, ram_start = 0;
    if (parse_config(s, &pos) < 0 || find_ram_start(s, pos, &ram_start) < 0)
        return -1;
    s->early_off = pos;
    s->early_len = ram_start - pos;
    pos = ram_start;
    if (parse_ram(s, &pos) < 0 || find_device_state(s, pos) < 0)
        return -1;
    return 0;
}

void br_snap_close(struct br_snap *s)
{
    for (size_t i = 0; i < s->nblocks; i++) {
        free(s->blocks[i].file_bitmap);
        free(s->blocks[i].sent);
    }
    /* Blocks being filled when a parse failed. */
    if (s->blocks && s->nblocks < BR_MAX_BLOCKS) {
        free(s->blocks[s->nblocks].file_bitmap);
        free(s->blocks[s->nblocks].sent);
    }
    free(s->blocks);
    if (s->fd > 0)
        close(s->fd);
    s->blocks = NULL;
    s->nblocks = 0;
    s->fd = -1;
}
