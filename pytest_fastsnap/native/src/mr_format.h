/* Strict parser for QEMU mapped-ram migration files (see README.md).
 *
 * mr_parse() validates the whole stream framing (header, configuration,
 * RAM START block list with MappedRamHeaders, RAM PART/END records,
 * device state, EOF, VM description) before anything is used.  The first
 * broken rule wins; its stable name (E_MAGIC ... E_VMDESC, table in
 * README.md) and a message naming the block and field land in mr_error.
 * Return convention, the loader's one (mr_errors.h): 0 ok, -1 with the
 * mr_error filled; the exit status is mr_error_exit(err->name).
 * No allocation is sized by an unchecked field: every length is compared
 * with the file size first, block count is capped at MR_MAX_BLOCKS.
 * The rules and their order mirror pytest_fastsnap/snapshot/format.py.
 */
#ifndef FASTSNAP_MR_FORMAT_H
#define FASTSNAP_MR_FORMAT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define MR_HEADER_SIZE 28u
#define MR_ALIGN 0x100000ull
#define MR_MAX_BLOCKS 1024u
#define MR_MAX_LIMITS 64u
#define MR_MAX_CAPS 64u

typedef struct mr_error {
    char name[24];          /* "E_PAGE_SIZE" ... */
    char msg[480];
} mr_error;

typedef struct mr_limit {   /* --max-length ID=BYTES */
    char id[256];
    uint64_t max_length;
} mr_limit;

typedef struct mr_limits {
    size_t count;
    mr_limit item[MR_MAX_LIMITS];
} mr_limits;

typedef struct mr_block {
    char id[256];
    uint64_t entry_offset;  /* str8 id */
    uint64_t used_length;
    uint64_t num_pages;
    uint64_t hdr_offset;
    uint32_t hdr_version;
    uint64_t page_size;
    uint64_t bitmap_offset;
    uint64_t bitmap_size;
    uint64_t pages_offset;
    uint64_t gpa;
    int ignored;            /* x-ignore-shared block without a region */
} mr_block;

/* A byte range [start, end) of the file; start == end == 0 when absent. */
typedef struct mr_range {
    uint64_t start, end;
} mr_range;

typedef struct mr_snapshot {
    uint64_t file_size;
    uint64_t stream_offset;
    char machine[257];
    uint64_t page_size;     /* target page size */
    /* Configuration record: the 07 byte .. the byte after its last
     * subsection.  Each subsection's range covers 05, str8 name, be32
     * version and its payload, verbatim (for replay). */
    mr_range config;
    mr_range sub_target_page_bits, sub_capabilities, sub_uuid;
    int has_target_page_bits;
    unsigned target_page_bits; /* valid if has_target_page_bits (9..16) */
    int has_uuid;
    unsigned char uuid[16];
    unsigned ncaps;            /* capability names in file order (first MR_MAX_CAPS) */
    char caps[MR_MAX_CAPS][256];
    mr_range early_setup;      /* [config.end, ram_start): early_setup FULL sections */
    int ignore_shared;
    uint32_t ram_sid;
    uint64_t ram_start;
    uint64_t total;
    size_t nblocks;
    mr_block *blocks;       /* malloc'd, nblocks entries */
    uint64_t dev_start;     /* device state [dev_start, eof_offset) */
    uint64_t eof_offset;
    int has_vmdesc;
    uint64_t vmdesc_offset; /* the 0x06 byte */
    uint64_t vmdesc_len;
} mr_snapshot;

/* Open path read-only for mr_parse: 0 with *fd set, or -1 with err E_OPEN
 * (cannot be opened: missing, no permission) or E_NOT_FILE (a directory or
 * another non-regular file); the message does not repeat the path. */
int mr_open(const char *path, int *fd, mr_error *err);

/* 0 valid; -1 with err filled: a format name (invalid file, exit 2) or
 * E_INTERNAL (out of memory, read error: exit 1). */
int mr_parse(int fd, uint64_t stream_offset, const mr_limits *limits, mr_snapshot *out,
             mr_error *err);
void mr_snapshot_free(mr_snapshot *snap);

static inline uint64_t mr_bitmap_size(uint64_t num_pages)
{
    return ((num_pages + 63) / 64) * 8;
}

/* The loader's one pread loop: up to n bytes at off, retrying EINTR and short
 * reads; returns the count read (short only at the end of the file), or -1
 * with errno on an I/O error.  Callers decide what a short count means. */
ssize_t mr_pread_upto(int fd, void *buf, size_t n, uint64_t off);

#endif
