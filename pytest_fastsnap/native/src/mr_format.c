/* Strict mapped-ram parser: see mr_format.h.  Rules and their order follow
 * pytest_fastsnap/snapshot/format.py (the independent Python reader), so the
 * two agree on every file; README.md lists the error names.
 *
 * Error convention, the loader's one (mr_errors.h): a function that finds a
 * broken rule fills c->err through fail() (an E_* identifier from
 * mr_errors.h, so the compiler checks the name) or internal() and returns
 * -1; every caller passes -1 up with TRY().  Values come back through out
 * parameters.  No setjmp/longjmp. */
#define _GNU_SOURCE
#include "mr_format.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mr_errors.h"

#define MAGIC 0x5145564Du
#define STREAM_VERSION 3u
#define VM_EOF 0x00
#define VM_START 0x01
#define VM_PART 0x02
#define VM_END 0x03
#define VM_FULL 0x04
#define VM_SUBSECTION 0x05
#define VM_VMDESC 0x06
#define VM_CONFIGURATION 0x07
#define VM_COMMAND 0x08
#define VM_FOOTER 0x7E
#define CMD_SWITCHOVER_START 0x0B
#define RAM_MEM_SIZE 0x04u
#define RAM_EOS 0x10u
#define RAM_SECTION_VERSION 4u
#define HDR_VERSION 1u
#define MAX_CAPABILITIES MR_MAX_CAPS
#define MAX_MACHINE_NAME 256u
#define SEARCH_WINDOW (16ull << 20)
#define VMDESC_MAX (64ull << 20)
#define CACHE_SIZE (64u << 10) /* read-ahead for the small framing reads */
#define JSON_MAX_DEPTH 1000u   /* about where Python's json.loads gives up */

/* Pass a failure (-1, c->err already filled) up to the caller. */
#define TRY(expr)                                                                                 \
    do {                                                                                          \
        if ((expr) < 0)                                                                           \
            return -1;                                                                            \
    } while (0)

typedef struct pctx {
    int fd;
    uint64_t size;
    mr_error *err;
    const mr_limits *limits;
    mr_snapshot *snap;
    unsigned char *window;  /* freed by mr_parse */
    unsigned char *cache;   /* CACHE_SIZE bytes of the file at cache_off */
    uint64_t cache_off;
    size_t cache_len;
} pctx;

static uint64_t sadd(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static uint64_t roundup_align(uint64_t v)
{
    uint64_t r = sadd(v, MR_ALIGN - 1);
    return r == UINT64_MAX ? UINT64_MAX : r - r % MR_ALIGN;
}

/* A broken format rule: name (E_MAGIC ... E_VMDESC) and message; -1. */
__attribute__((format(printf, 3, 4)))
static int fail(pctx *c, const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mr_error_vset(c->err, name, fmt, ap);
    va_end(ap);
    return -1;
}

/* Not the file's fault (out of memory, a read error): E_INTERNAL; -1. */
__attribute__((format(printf, 2, 3)))
static int internal(pctx *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mr_error_vset(c->err, E_INTERNAL, fmt, ap);
    va_end(ap);
    return -1;
}

/* See mr_format.h. */
ssize_t mr_pread_upto(int fd, void *buf, size_t n, uint64_t off)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)buf + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

/* Up to n bytes at off into buf, *got = the count (short only at the end of
 * the file); -1 on a read error. */
static int pread_upto(pctx *c, uint64_t off, size_t n, void *buf, size_t *got)
{
    ssize_t r = mr_pread_upto(c->fd, buf, n, off);
    if (r < 0)
        return internal(c, "pread at %#" PRIx64 ": %s", off, strerror(errno));
    *got = (size_t)r;
    return 0;
}

/* Exactly n bytes at offset: 1, or 0 if they are not in the file (no error
 * set), or -1 on a read error.  Small reads go through a read-ahead cache:
 * the framing is millions of tiny fields in a hostile file (e.g. a flood of
 * 18-byte RAM PART records), and one pread per field made verify take ~5 s
 * per million records. */
static int peek(pctx *c, uint64_t off, size_t n, void *buf)
{
    size_t got = 0;
    if (off > c->size || n > c->size - off)
        return 0;
    if (n > CACHE_SIZE / 2) {
        TRY(pread_upto(c, off, n, buf, &got));
        return got == n;
    }
    if (off < c->cache_off || off + n > c->cache_off + c->cache_len) {
        uint64_t want = c->size - off < CACHE_SIZE ? c->size - off : CACHE_SIZE;
        c->cache_off = off;
        c->cache_len = 0; /* stays empty if the read fails */
        TRY(pread_upto(c, off, (size_t)want, c->cache, &got));
        c->cache_len = got;
        if (n > c->cache_len)
            return 0; /* the file shrank after fstat */
    }
    memcpy(buf, c->cache + (off - c->cache_off), n);
    return 1;
}

/* Exactly n bytes at off, or E_TRUNCATED naming `what`. */
static int rd(pctx *c, uint64_t off, size_t n, void *buf, const char *what)
{
    if (off > c->size || n > c->size - off)
        return fail(c, E_TRUNCATED, "%s needs bytes [%#" PRIx64 ", %#" PRIx64 ") but the file "
                    "ends at %#" PRIx64, what, off, sadd(off, n), c->size);
    int r = peek(c, off, n, buf);
    TRY(r);
    if (!r)
        return fail(c, E_TRUNCATED, "%s: short read at %#" PRIx64, what, off);
    return 0;
}

static uint64_t be(const unsigned char *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* Big-endian n-byte unsigned at off into *v. */
static int uint_at(pctx *c, uint64_t off, size_t n, const char *what, uint64_t *v)
{
    unsigned char b[8];
    TRY(rd(c, off, n, b, what));
    *v = be(b, n);
    return 0;
}

/* str8 at off into out (NUL-terminated, 256 bytes); *next = the offset after it. */
static int str8(pctx *c, uint64_t off, char *out, const char *what, uint64_t *next)
{
    uint64_t n = 0;
    TRY(uint_at(c, off, 1, what, &n));
    TRY(rd(c, off + 1, (size_t)n, out, what));
    out[n] = 0;
    *next = off + 1 + n;
    return 0;
}

/* Printable copy of a block id for messages. */
static const char *pid(const char *id, char *buf, size_t len)
{
    size_t j = 0;
    for (size_t i = 0; id[i] && j + 5 < len; i++) {
        unsigned char ch = (unsigned char)id[i];
        if (ch >= 0x20 && ch < 0x7f && ch != '"' && ch != '\\')
            buf[j++] = (char)ch;
        else
            j += (size_t)snprintf(buf + j, len - j, "\\x%02x", ch);
    }
    buf[j] = 0;
    return buf;
}

/* The configuration record at pos; *end = the byte after it. */
static int configuration(pctx *c, uint64_t pos, uint64_t *end_out)
{
    mr_snapshot *s = c->snap;
    uint64_t kind = 0, len = 0;
    TRY(uint_at(c, pos, 1, "configuration record", &kind));
    if (kind != VM_CONFIGURATION)
        return fail(c, E_CONFIG, "configuration record missing at %#" PRIx64 ": byte %#04x != "
                    "0x07", pos, (unsigned)kind);
    TRY(uint_at(c, pos + 1, 4, "machine name length", &len));
    if (len == 0 || len > MAX_MACHINE_NAME)
        return fail(c, E_CONFIG, "configuration: machine name length %" PRIu64 " not in 1..%u",
                    len, MAX_MACHINE_NAME);
    s->config.start = pos;
    TRY(rd(c, pos + 5, (size_t)len, s->machine, "machine name"));
    s->machine[len] = 0;
    uint64_t cur = pos + 5 + len;
    int have_mapped_ram = 0, have_bits = 0;
    unsigned bits = 12;
    for (;;) {
        uint64_t mark = 0, vid_at = 0, version = 0;
        TRY(uint_at(c, cur, 1, "configuration subsection", &mark));
        if (mark != VM_SUBSECTION)
            break;
        char name[256];
        TRY(str8(c, cur + 1, name, "subsection name", &vid_at));
        TRY(uint_at(c, vid_at, 4, "subsection version", &version));
        uint64_t body = vid_at + 4, end;
        mr_range *range;
        if (strcmp(name, "configuration/target-page-bits") == 0) {
            uint64_t v = 0;
            TRY(uint_at(c, body, 4, "target-page-bits", &v));
            if (v < 9 || v > 16)
                return fail(c, E_CONFIG, "configuration/target-page-bits %" PRIu64
                            " not in 9..16", v);
            bits = (unsigned)v;
            have_bits = 1;
            end = body + 4;
            range = &s->sub_target_page_bits;
        } else if (strcmp(name, "configuration/capabilities") == 0) {
            uint64_t n = 0;
            TRY(uint_at(c, body, 4, "capability count", &n));
            if (n > MAX_CAPABILITIES)
                return fail(c, E_CONFIG, "configuration/capabilities count %" PRIu64 " > %u", n,
                            MAX_CAPABILITIES);
            end = body + 4;
            for (uint64_t i = 0; i < n; i++) {
                char cap[256];
                TRY(str8(c, end, cap, "capability name", &end));
                if (s->ncaps < MR_MAX_CAPS) /* a repeated subsection adds more */
                    memcpy(s->caps[s->ncaps++], cap, sizeof cap);
                if (strcmp(cap, "mapped-ram") == 0)
                    have_mapped_ram = 1;
                if (strcmp(cap, "x-ignore-shared") == 0)
                    s->ignore_shared = 1;
            }
            range = &s->sub_capabilities;
        } else if (strcmp(name, "configuration/uuid") == 0) {
            unsigned char uuid[16];
            TRY(rd(c, body, 16, uuid, "uuid"));
            end = body + 16;
            memcpy(s->uuid, uuid, 16);
            s->has_uuid = 1;
            range = &s->sub_uuid;
        } else {
            char p[256 * 4 + 8];
            return fail(c, E_CONFIG, "unknown configuration subsection \"%s\" at %#" PRIx64,
                        pid(name, p, sizeof p), cur);
        }
        range->start = cur; /* a repeated subsection: the range of the last one */
        range->end = end;
        cur = end;
    }
    s->config.end = cur;
    s->has_target_page_bits = have_bits;
    s->target_page_bits = bits;
    if (have_bits)
        s->page_size = 1ull << bits;
    if (!have_mapped_ram)
        return fail(c, E_CONFIG, "configuration/capabilities does not list mapped-ram");
    *end_out = cur;
    return 0;
}

/* The RAM START record at or after pos (within SEARCH_WINDOW) into *at. */
static int find_ram_start(pctx *c, uint64_t pos, uint64_t *at_out)
{
    unsigned char b[9];
    int r = peek(c, pos, 9, b);
    TRY(r);
    if (r && b[0] == VM_START && memcmp(b + 5, "\x03ram", 4) == 0) {
        *at_out = pos;
        return 0;
    }
    uint64_t n = c->size - pos;
    if (n > SEARCH_WINDOW)
        n = SEARCH_WINDOW;
    if (n >= 9) {
        c->window = malloc((size_t)n);
        if (!c->window)
            return internal(c, "out of memory (%" PRIu64 " bytes)", n);
        r = peek(c, pos, (size_t)n, c->window);
        TRY(r);
        if (r) {
            unsigned char *w = c->window;
            /* memmem, not a byte loop: up to 16 MiB of early setup per file. */
            for (uint64_t at = 5; at + 4 <= n; at++) {
                unsigned char *hit = memmem(w + at, (size_t)(n - at), "\003ram", 4);
                if (!hit)
                    break;
                at = (uint64_t)(hit - w);
                if (w[at - 5] == VM_START) {
                    free(c->window);
                    c->window = NULL;
                    *at_out = pos + at - 5;
                    return 0;
                }
            }
        }
        free(c->window);
        c->window = NULL;
    }
    return fail(c, E_RAM_SECTION, "no RAM START record (01 sid 03 'ram') after the "
                "configuration at %#" PRIx64, pos);
}

/* 1 if the RAM START EOS + footer of sid is at pos, 0 if not, -1 on error. */
static int is_eos(pctx *c, uint64_t pos, uint32_t sid)
{
    unsigned char b[13];
    int r = peek(c, pos, 13, b);
    TRY(r);
    return r && be(b, 8) == RAM_EOS && b[8] == VM_FOOTER && be(b + 9, 4) == sid;
}

/* 1 if a block entry plausibly starts at pos, 0 if not, -1 on error. */
static int plausible_block(pctx *c, uint64_t pos)
{
    unsigned char n, raw[MR_HEADER_SIZE];
    int r = peek(c, pos, 1, &n);
    if (r <= 0)
        return r;
    uint64_t hdr = pos + 1 + n + 8 + (c->snap->ignore_shared ? 8 : 0);
    r = peek(c, hdr, MR_HEADER_SIZE, raw);
    if (r <= 0)
        return r;
    uint64_t version = be(raw, 4), ps = be(raw + 4, 8), bo = be(raw + 12, 8),
             po = be(raw + 20, 8);
    int score = (version == HDR_VERSION) + (ps == c->snap->page_size) +
                (bo == hdr + MR_HEADER_SIZE) + (po % MR_ALIGN == 0 && po > hdr);
    return score >= 2;
}

/* E_TRUNCATED unless a whole block entry (or the EOS) fits at pos. */
static int need_entry(pctx *c, uint64_t pos)
{
    unsigned char n;
    int r = peek(c, pos, 1, &n);
    TRY(r);
    if (!r)
        return fail(c, E_TRUNCATED, "file ends at %#" PRIx64 " where a block entry or the EOS "
                    "should start", c->size);
    uint64_t need = 1u + n + 8u + (c->snap->ignore_shared ? 8u : 0u) + MR_HEADER_SIZE;
    if (pos + (need < 13 ? need : 13) > c->size || (pos + need > c->size && n > 0))
        return fail(c, E_TRUNCATED, "file ends at %#" PRIx64 " inside the block entry at %#"
                    PRIx64, c->size, pos);
    return 0;
}

static int ranges_overlap(uint64_t a0, uint64_t a1, uint64_t b0, uint64_t b1)
{
    return a1 > a0 && b1 > b0 && a0 < b1 && b0 < a1;
}

static int overlaps_earlier(pctx *c, size_t index, uint64_t s, uint64_t e)
{
    for (size_t i = 0; i < index; i++) {
        const mr_block *b = &c->snap->blocks[i];
        if (b->ignored)
            continue;
        if (ranges_overlap(s, e, b->bitmap_offset, sadd(b->bitmap_offset, b->bitmap_size)) ||
            ranges_overlap(s, e, b->pages_offset, sadd(b->pages_offset, b->used_length)))
            return 1;
    }
    return 0;
}

/* Block entry `index` at pos: id, length, MappedRamHeader, regions. */
static int block(pctx *c, size_t index, uint64_t pos)
{
    mr_snapshot *s = c->snap;
    mr_block *b = &s->blocks[index];
    char p[256 * 4 + 8];
    memset(b, 0, sizeof *b);
    b->entry_offset = pos;
    uint64_t cur = 0;
    TRY(str8(c, pos, b->id, "block id", &cur));
    const char *name = pid(b->id, p, sizeof p);
    if (!b->id[0])
        return fail(c, E_BLOCK_ID, "block %zu at %#" PRIx64 ": id is empty", index, pos);
    for (size_t i = 0; i < index; i++)
        if (strcmp(s->blocks[i].id, b->id) == 0)
            return fail(c, E_BLOCK_ID, "block %zu \"%s\": duplicate id (also block %zu)", index,
                        name, i);
    TRY(uint_at(c, cur, 8, "block used_length", &b->used_length));
    if (b->used_length == 0 || b->used_length % s->page_size)
        return fail(c, E_BLOCK_LENGTH, "block \"%s\" used_length %#" PRIx64 " is 0 or not a "
                    "multiple of %" PRIu64, name, b->used_length, s->page_size);
    if (c->limits)
        for (size_t i = 0; i < c->limits->count; i++)
            if (strcmp(c->limits->item[i].id, b->id) == 0 &&
                b->used_length > c->limits->item[i].max_length)
                return fail(c, E_MAX_LENGTH, "block \"%s\" used_length %#" PRIx64 " exceeds "
                            "max_length %#" PRIx64, name, b->used_length,
                            c->limits->item[i].max_length);
    cur += 8;
    if (s->ignore_shared) {
        TRY(uint_at(c, cur, 8, "block GPA", &b->gpa));
        cur += 8;
    }
    unsigned char h[MR_HEADER_SIZE];
    char what[300];
    snprintf(what, sizeof what, "MappedRamHeader of block \"%.250s\"", name);
    TRY(rd(c, cur, MR_HEADER_SIZE, h, what));
    b->hdr_offset = cur;
    b->hdr_version = (uint32_t)be(h, 4);
    b->page_size = be(h + 4, 8);
    b->bitmap_offset = be(h + 12, 8);
    b->pages_offset = be(h + 20, 8);
    uint64_t hend = cur + MR_HEADER_SIZE;
    if (b->hdr_version != HDR_VERSION)
        return fail(c, E_HDR_VERSION, "block \"%s\" header version %" PRIu32 " != 1", name,
                    b->hdr_version);
    if (b->page_size != s->page_size)
        return fail(c, E_PAGE_SIZE, "block \"%s\" header page_size %" PRIu64 " != %" PRIu64,
                    name, b->page_size, s->page_size);
    b->num_pages = b->used_length / s->page_size;
    b->bitmap_size = mr_bitmap_size(b->num_pages);
    uint64_t bo = b->bitmap_offset, po = b->pages_offset;
    if (s->ignore_shared && bo == 0 && po == 0) {
        b->ignored = 1;
        return 0;
    }
    uint64_t bend = sadd(bo, b->bitmap_size);
    if (bo >= c->size)
        return fail(c, E_BITMAP_OFFSET, "block \"%s\" bitmap_offset %#" PRIx64 " at/after EOF "
                    "(%#" PRIx64 ")", name, bo, c->size);
    if (bend > c->size)
        return fail(c, E_TRUNCATED, "block \"%s\" bitmap [%#" PRIx64 ", %#" PRIx64 ") runs past "
                    "EOF (%#" PRIx64 ")", name, bo, bend, c->size);
    if (overlaps_earlier(c, index, bo, bend))
        return fail(c, E_OVERLAP, "block \"%s\" bitmap [%#" PRIx64 ", %#" PRIx64 ") overlaps an "
                    "earlier block's region", name, bo, bend);
    if (bo != hend)
        return fail(c, E_BITMAP_OFFSET, "block \"%s\" bitmap_offset %#" PRIx64 " is not right "
                    "after its header (%#" PRIx64 ")", name, bo, hend);
    uint64_t pend = sadd(po, b->used_length);
    uint64_t want = roundup_align(sadd(hend, b->bitmap_size));
    if (po % MR_ALIGN)
        return fail(c, E_PAGES_ALIGN, "block \"%s\" pages_offset %#" PRIx64 " is not 1 MiB "
                    "aligned", name, po);
    if (po >= c->size)
        return fail(c, E_PAGES_OFFSET, "block \"%s\" pages_offset %#" PRIx64 " at/after EOF (%#"
                    PRIx64 ")", name, po, c->size);
    if (po < sadd(hend, b->bitmap_size) || overlaps_earlier(c, index, po, pend))
        return fail(c, E_OVERLAP, "block \"%s\" pages [%#" PRIx64 ", %#" PRIx64 ") overlap its "
                    "header/bitmap or an earlier block", name, po, pend);
    if (po != want)
        return fail(c, E_PAGES_OFFSET, "block \"%s\" pages_offset %#" PRIx64 " != roundup("
                    "bitmap end, 1 MiB) = %#" PRIx64, name, po, want);
    if (pend > c->size)
        return fail(c, E_TRUNCATED, "block \"%s\" pages [%#" PRIx64 ", %#" PRIx64 ") run past "
                    "EOF (%#" PRIx64 ")", name, po, pend, c->size);
    return 0;
}

/* The section footer (7e sid) at pos; *next = pos + 5. */
static int footer(pctx *c, uint64_t pos, uint32_t sid, const char *what, uint64_t *next)
{
    char w[64];
    snprintf(w, sizeof w, "%s footer", what);
    uint64_t mark = 0, fsid = 0;
    TRY(uint_at(c, pos, 1, w, &mark));
    TRY(uint_at(c, pos + 1, 4, w, &fsid));
    if (mark != VM_FOOTER || fsid != sid)
        return fail(c, E_FOOTER, "%s: expected footer 7e %#x at %#" PRIx64 ", got %#04x %#"
                    PRIx64, what, sid, pos, (unsigned)mark, fsid);
    *next = pos + 5;
    return 0;
}

/* Grows s->blocks for one more block (geometrically; the count is capped). */
static int grow_blocks(pctx *c, size_t *cap)
{
    mr_snapshot *s = c->snap;
    if (s->nblocks >= MR_MAX_BLOCKS)
        return fail(c, E_RAM_SECTION, "more than %u blocks", MR_MAX_BLOCKS);
    if (s->nblocks < *cap)
        return 0;
    size_t ncap = *cap ? *cap * 2 : 8;
    mr_block *nb = realloc(s->blocks, ncap * sizeof *nb);
    if (!nb)
        return internal(c, "out of memory");
    s->blocks = nb;
    *cap = ncap;
    return 0;
}

/* RAM START at pos: section header, MEM_SIZE, the block list, EOS, footer;
 * *next = the byte after its footer. */
static int ram_start(pctx *c, uint64_t pos, uint64_t *next_out)
{
    mr_snapshot *s = c->snap;
    char idstr[256];
    uint64_t sid = 0, cur = 0, instance = 0, version = 0, mem = 0;
    s->ram_start = pos;
    TRY(uint_at(c, pos + 1, 4, "RAM section id", &sid));
    s->ram_sid = (uint32_t)sid;
    TRY(str8(c, pos + 5, idstr, "RAM section idstr", &cur));
    TRY(uint_at(c, cur, 4, "RAM instance id", &instance));
    TRY(uint_at(c, cur + 4, 4, "RAM section version", &version));
    if (instance != 0)
        return fail(c, E_RAM_SECTION, "RAM START instance id %" PRIu64 " != 0", instance);
    if (version != RAM_SECTION_VERSION)
        return fail(c, E_RAM_SECTION, "RAM START section version %" PRIu64 " != 4", version);
    uint64_t mem_at = cur + 8;
    TRY(uint_at(c, mem_at, 8, "MEM_SIZE", &mem));
    uint64_t flags = mem & (s->page_size - 1), total = mem & ~(s->page_size - 1);
    s->total = total;
    if (flags != RAM_MEM_SIZE)
        return fail(c, E_RAM_SECTION, "RAM START first record flags %#" PRIx64 " are not "
                    "MEM_SIZE (0x4)", flags);
    if (total == 0)
        return fail(c, E_TOTAL, "RAM START MEM_SIZE total is 0");
    size_t cap = 0;
    uint64_t summed = 0;
    cur = mem_at + 8;
    for (;;) {
        TRY(grow_blocks(c, &cap));
        size_t index = s->nblocks;
        TRY(block(c, index, cur));
        s->nblocks++;
        mr_block *b = &s->blocks[index];
        char p[256 * 4 + 8];
        summed = sadd(summed, b->used_length);
        uint64_t next = b->ignored ? b->hdr_offset + MR_HEADER_SIZE
                                   : sadd(b->pages_offset, b->used_length);
        if (next > c->size)
            return fail(c, E_TRUNCATED, "block \"%s\" region ends past EOF",
                        pid(b->id, p, sizeof p));
        if (next <= b->entry_offset)
            return fail(c, E_BLOCK_LENGTH, "block \"%s\" at %#" PRIx64 " sends the stream back "
                        "to %#" PRIx64, pid(b->id, p, sizeof p), b->entry_offset, next);
        cur = next;
        int eos = is_eos(c, cur, s->ram_sid);
        TRY(eos);
        int plausible = eos ? 0 : plausible_block(c, cur);
        TRY(plausible);
        if (!eos && !plausible)
            TRY(need_entry(c, cur));
        if (eos) {
            if (summed != total)
                return fail(c, E_TOTAL, "RAM START blocks sum to %#" PRIx64 " but MEM_SIZE "
                            "total is %#" PRIx64, summed, total);
            break;
        }
        if (plausible) {
            if (summed >= total)
                return fail(c, E_TOTAL, "another block follows at %#" PRIx64 " but the blocks "
                            "already sum to %#" PRIx64 " >= MEM_SIZE total %#" PRIx64, cur,
                            summed, total);
            continue;
        }
        unsigned char f[8];
        int r = summed == total ? peek(c, cur, 8, f) : 0;
        TRY(r);
        if (r && be(f, 8) == RAM_EOS)
            break;
        return fail(c, E_BLOCK_LENGTH, "block \"%s\" used_length %#" PRIx64 " ends at %#"
                    PRIx64 ", where neither a block nor the EOS follows",
                    pid(b->id, p, sizeof p), b->used_length, cur);
    }
    uint64_t eos_flags = 0;
    TRY(uint_at(c, cur, 8, "RAM START EOS", &eos_flags));
    return footer(c, cur + 8, s->ram_sid, "RAM START", next_out);
}

/* RAM PART/END records (and SWITCHOVER_START) up to RAM END's footer;
 * *next = the byte after it. */
static int ram_records(pctx *c, uint64_t pos, uint64_t *next_out)
{
    uint32_t sid = c->snap->ram_sid;
    for (;;) {
        uint64_t kind = 0;
        TRY(uint_at(c, pos, 1, "record type", &kind));
        if (kind == VM_PART || kind == VM_END) {
            const char *label = kind == VM_PART ? "RAM PART" : "RAM END";
            uint64_t rsid = 0, flags = 0;
            TRY(uint_at(c, pos + 1, 4, "record section id", &rsid));
            if (rsid != sid)
                return fail(c, E_RECORD, "record %#04x at %#" PRIx64 " for section %" PRIu64
                            " (only the RAM section %u is allowed before RAM END)",
                            (unsigned)kind, pos, rsid, sid);
            TRY(uint_at(c, pos + 5, 8, "RAM record flags", &flags));
            if (flags != RAM_EOS)
                return fail(c, E_RECORD, "%s at %#" PRIx64 ": flags %#" PRIx64 " (only EOS is "
                            "allowed in a mapped-ram stream)", label, pos, flags);
            TRY(footer(c, pos + 13, sid, label, &pos));
            if (kind == VM_END) {
                *next_out = pos;
                return 0;
            }
        } else if (kind == VM_COMMAND) {
            uint64_t cmd = 0, len = 0;
            TRY(uint_at(c, pos + 1, 2, "command", &cmd));
            TRY(uint_at(c, pos + 3, 2, "command length", &len));
            if (cmd != CMD_SWITCHOVER_START || len != 0)
                return fail(c, E_RECORD, "command %#" PRIx64 " length %" PRIu64 " at %#" PRIx64
                            " (only SWITCHOVER_START 08 000b 0000 is allowed before RAM END)",
                            cmd, len, pos);
            pos += 5;
        } else {
            return fail(c, E_RECORD, "unexpected record type %#04x at %#" PRIx64 " before RAM "
                        "END", (unsigned)kind, pos);
        }
    }
}

static size_t utf8_check(const unsigned char *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char b = p[i];
        size_t len;
        uint32_t cp, min;
        if (b < 0x80) {
            i++;
            continue;
        } else if ((b & 0xe0) == 0xc0) {
            len = 2, cp = b & 0x1f, min = 0x80;
        } else if ((b & 0xf0) == 0xe0) {
            len = 3, cp = b & 0x0f, min = 0x800;
        } else if ((b & 0xf8) == 0xf0) {
            len = 4, cp = b & 0x07, min = 0x10000;
        } else {
            return i;
        }
        if (n - i < len)
            return i;
        for (size_t k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80)
                return i;
            cp = cp << 6 | (p[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return i;
        i += len;
    }
    return n;
}

static size_t json_ws(const unsigned char *p, size_t n, size_t i)
{
    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r'))
        i++;
    return i;
}

/* A JSON string at p[i] == '"'; returns the offset after it, or 0. */
static size_t json_string(const unsigned char *p, size_t n, size_t i)
{
    for (i++; i < n; i++) {
        if (p[i] == '"')
            return i + 1;
        if (p[i] < 0x20)
            return 0;
        if (p[i] == '\\') {
            if (++i >= n)
                return 0;
            if (p[i] == 'u') {
                for (int k = 0; k < 4; k++)
                    if (++i >= n || !((p[i] >= '0' && p[i] <= '9') ||
                                      ((p[i] | 0x20) >= 'a' && (p[i] | 0x20) <= 'f')))
                        return 0;
            } else if (!strchr("\"\\/bfnrt", p[i]) || !p[i]) {
                return 0;
            }
        }
    }
    return 0;
}

static int json_lit(const unsigned char *p, size_t n, size_t i, const char *lit)
{
    size_t l = strlen(lit);
    return n - i >= l && memcmp(p + i, lit, l) == 0;
}

/* A number or a literal (true, false, null and Python's NaN, Infinity,
 * -Infinity) at p[i]; returns the offset after it, or 0. */
static size_t json_scalar(const unsigned char *p, size_t n, size_t i)
{
    static const char *lits[] = {"true", "false", "null", "NaN", "Infinity", "-Infinity"};
    for (size_t k = 0; k < sizeof lits / sizeof *lits; k++)
        if (json_lit(p, n, i, lits[k]))
            return i + strlen(lits[k]);
    size_t j = i;
    if (j < n && p[j] == '-')
        j++;
    if (j < n && p[j] == '0') {
        j++;
    } else if (j < n && p[j] >= '1' && p[j] <= '9') {
        while (j < n && p[j] >= '0' && p[j] <= '9')
            j++;
    } else {
        return 0;
    }
    if (j < n && p[j] == '.') {
        size_t d = ++j;
        while (j < n && p[j] >= '0' && p[j] <= '9')
            j++;
        if (j == d)
            return 0;
    }
    if (j < n && (p[j] | 0x20) == 'e') {
        j++;
        if (j < n && (p[j] == '+' || p[j] == '-'))
            j++;
        size_t d = j;
        while (j < n && p[j] >= '0' && p[j] <= '9')
            j++;
        if (j == d)
            return 0;
    }
    return j;
}

/* 0 if p[0..n) is exactly one JSON value (json.loads rules, nesting at most
 * JSON_MAX_DEPTH, no recursion), else -1 with *at = the first bad offset. */
static int json_check(const unsigned char *p, size_t n, size_t *at)
{
    unsigned char stack[JSON_MAX_DEPTH];
    size_t depth = 0, i = 0, e;
value:
    i = json_ws(p, n, i);
    if (i >= n)
        goto bad;
    if (p[i] == '{' || p[i] == '[') {
        if (depth == JSON_MAX_DEPTH)
            goto bad;
        stack[depth++] = p[i];
        i = json_ws(p, n, i + 1);
        if (i < n && p[i] == (stack[depth - 1] == '{' ? '}' : ']')) {
            depth--;
            i++;
            goto after;
        }
        if (stack[depth - 1] == '[')
            goto value;
        goto key;
    }
    e = p[i] == '"' ? json_string(p, n, i) : json_scalar(p, n, i);
    if (!e)
        goto bad;
    i = e;
after:
    i = json_ws(p, n, i);
    if (depth == 0) {
        if (i == n)
            return 0;
        goto bad;
    }
    if (i >= n)
        goto bad;
    if (p[i] == ',') {
        i = json_ws(p, n, i + 1);
        if (stack[depth - 1] == '[')
            goto value;
        goto key;
    }
    if (p[i] == (stack[depth - 1] == '{' ? '}' : ']')) {
        depth--;
        i++;
        goto after;
    }
    goto bad;
key:
    if (i >= n || p[i] != '"' || !(e = json_string(p, n, i)))
        goto bad;
    i = json_ws(p, n, e);
    if (i >= n || p[i] != ':')
        goto bad;
    i++;
    goto value;
bad:
    *at = i;
    return -1;
}


/* Device state from dev_start, the EOF byte and the VM description (the
 * last up to VMDESC_MAX bytes are searched for it). */
static int tail(pctx *c, uint64_t dev_start)
{
    mr_snapshot *s = c->snap;
    uint64_t size = c->size;
    uint64_t ws = dev_start;
    if (size > VMDESC_MAX && size - VMDESC_MAX > ws)
        ws = size - VMDESC_MAX;
    uint64_t wlen = size > ws ? size - ws : 0;
    c->window = malloc(wlen ? (size_t)wlen : 1);
    if (!c->window)
        return internal(c, "out of memory (%" PRIu64 " bytes)", wlen);
    unsigned char *w = c->window;
    if (wlen) {
        int r = peek(c, ws, (size_t)wlen, w);
        TRY(r);
        if (!r)
            wlen = 0;
    }
    int found = 0;
    uint64_t fpos = 0;
    uint64_t at = wlen;
    for (int tries = 0; tries < 4096; tries++) {
        unsigned char *hit = memrchr(w, VM_VMDESC, (size_t)at);
        if (!hit)
            break;
        at = (uint64_t)(hit - w);
        if (at + 5 > wlen)
            continue;
        uint64_t len = be(w + at + 1, 4);
        if (ws + at + 5 + len == size && at + 5 < wlen && w[at + 5] == '{') {
            found = 1;
            fpos = ws + at;
            break;
        }
    }
    uint64_t eof;
    if (found) {
        if (fpos < 1 || fpos - 1 < dev_start)
            return fail(c, E_EOF, "VM description at %#" PRIx64 " without an EOF byte before it",
                        fpos);
        eof = fpos - 1;
        uint64_t eb = 0;
        TRY(uint_at(c, eof, 1, "EOF", &eb));
        if (eb != VM_EOF)
            return fail(c, E_EOF, "byte %#" PRIx64 " before the VM description is %#04x, not "
                        "EOF (00)", eof, (unsigned)eb);
        /* Like the Python reader: the description must be UTF-8 JSON. */
        const unsigned char *body = w + (fpos - ws) + 5;
        size_t blen = (size_t)(size - fpos - 5), bad = utf8_check(body, blen);
        if (bad < blen)
            return fail(c, E_VMDESC, "VM description at %#" PRIx64 " is not UTF-8 (byte %#"
                        PRIx64 ")", fpos, fpos + 5 + bad);
        if (json_check(body, blen, &bad) < 0)
            return fail(c, E_VMDESC, "VM description at %#" PRIx64 " is not JSON (at byte %#"
                        PRIx64 ")", fpos, fpos + 5 + bad);
        s->has_vmdesc = 1;
        s->vmdesc_offset = fpos;
        s->vmdesc_len = size - fpos - 5;
    } else {
        int good = 0;
        if (size >= 1 && size - 1 >= dev_start && wlen >= 1) {
            eof = size - 1;
            int ends_with_footer = size >= 5 && size - 5 >= dev_start && wlen >= 5 &&
                                   w[wlen - 5] == VM_FOOTER;
            good = w[wlen - 1] == 0 && !ends_with_footer &&
                   (eof == dev_start || (eof >= 5 && eof - 5 >= ws && w[eof - 5 - ws] == VM_FOOTER));
        }
        if (!good) {
            int in_vmdesc = 0;
            /* The last "00 06" (memrchr: the window can be megabytes). */
            for (uint64_t at = wlen; at >= 2;) {
                unsigned char *hit = memrchr(w + 1, VM_VMDESC, (size_t)(at - 1));
                if (!hit)
                    break;
                uint64_t h = (uint64_t)(hit - w);
                if (w[h - 1] == 0) {
                    in_vmdesc = h + 5 < wlen && w[h + 5] == '{';
                    break;
                }
                at = h;
            }
            return fail(c, E_TRUNCATED, "the file ends %s (size %#" PRIx64 ")",
                        in_vmdesc ? "inside the VM description" : "without the EOF byte", size);
        }
        eof = size - 1;
    }
    s->dev_start = dev_start;
    s->eof_offset = eof;
    if (eof > dev_start) {
        uint64_t first = 0, last = 0;
        TRY(uint_at(c, dev_start, 1, "device state", &first));
        if (first != VM_FULL)
            return fail(c, E_RECORD, "device state at %#" PRIx64 " does not start with a FULL "
                        "section (04)", dev_start);
        if (eof >= 5 && eof - 5 >= dev_start)
            TRY(uint_at(c, eof - 5, 1, "footer", &last));
        if (eof < 5 || eof - 5 < dev_start || last != VM_FOOTER)
            return fail(c, E_FOOTER, "device state [%#" PRIx64 ", %#" PRIx64 ") does not end "
                        "with a section footer", dev_start, eof);
    }
    return 0;
}

int mr_open(const char *path, int *fd, mr_error *err)
{
    struct stat st;
    memset(err, 0, sizeof *err);
    *fd = open(path, O_RDONLY | O_CLOEXEC);
    if (*fd < 0)
        return mr_error_set(err, E_OPEN, "cannot open: %s", strerror(errno));
    if (fstat(*fd, &st) < 0)
        mr_error_set(err, E_OPEN, "cannot stat: %s", strerror(errno));
    else if (S_ISREG(st.st_mode))
        return 0;
    else
        mr_error_set(err, E_NOT_FILE, "%s", S_ISDIR(st.st_mode)
                     ? "is a directory, not a snapshot file" : "not a regular file");
    close(*fd);
    *fd = -1;
    return -1;
}

/* The stream from its header to the VM description, in file order. */
static int parse_stream(pctx *c)
{
    c->cache = malloc(CACHE_SIZE);
    if (!c->cache)
        return internal(c, "out of memory (%u bytes)", CACHE_SIZE);
    struct stat st;
    if (fstat(c->fd, &st) < 0)
        return internal(c, "fstat: %s", strerror(errno));
    c->size = c->snap->file_size = (uint64_t)st.st_size;
    uint64_t s = c->snap->stream_offset, magic = 0, version = 0, pos = 0;
    if (s > c->size)
        return fail(c, E_TRUNCATED, "stream offset %#" PRIx64 " beyond the file (%#" PRIx64 ")",
                    s, c->size);
    TRY(uint_at(c, s, 4, "stream magic", &magic));
    if (magic != MAGIC)
        return fail(c, E_MAGIC, "stream header at %#" PRIx64 ": magic %#010" PRIx64 " != "
                    "0x5145564d (QEVM)", s, magic);
    TRY(uint_at(c, s + 4, 4, "stream version", &version));
    if (version != STREAM_VERSION)
        return fail(c, E_VERSION, "stream header: version %" PRIu64 " != 3%s", version,
                    version == 2 ? " (v2 is obsolete)" : "");
    TRY(configuration(c, s + 8, &pos));
    TRY(find_ram_start(c, pos, &pos));
    c->snap->early_setup.start = c->snap->config.end;
    c->snap->early_setup.end = pos;
    TRY(ram_start(c, pos, &pos));
    TRY(ram_records(c, pos, &pos));
    return tail(c, pos);
}

int mr_parse(int fd, uint64_t stream_offset, const mr_limits *limits, mr_snapshot *out,
             mr_error *err)
{
    pctx c;
    memset(&c, 0, sizeof c);
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    c.fd = fd;
    c.err = err;
    c.limits = limits;
    c.snap = out;
    out->page_size = 4096;
    out->stream_offset = stream_offset;
    int rc = parse_stream(&c);
    free(c.window);
    free(c.cache);
    if (rc < 0)
        mr_snapshot_free(out);
    return rc;
}

void mr_snapshot_free(mr_snapshot *snap)
{
    free(snap->blocks);
    snap->blocks = NULL;
    snap->nblocks = 0;
}
