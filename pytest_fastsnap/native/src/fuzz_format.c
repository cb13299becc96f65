/* libFuzzer harness for the strict mapped-ram parser (mr_format.c):
 *   clang -fsanitize=fuzzer,address,undefined fuzz_format.c mr_format.c
 * Each input is written to a memfd (raw, or decoded from the sparse "FSX1"
 * encoding below) and parsed with stream offset 0; any
 * crash, sanitizer report, leak or timeout is a bug.  Not part of the
 * loader binary (loader.py skips fuzz_*.c). */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mr_errors.h"
#include "mr_format.h"
#include "mr_libvirt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void put(int fd, const uint8_t *p, size_t n, off_t at)
{
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, at);
        if (w <= 0)
            abort();
        p += w;
        n -= (size_t)w;
        at += w;
    }
}

/* Inputs starting with "FSX1" are sparse files in a compact encoding, so a
 * real stream (page regions 1 MiB aligned) fits in a few KiB and runs fast:
 * repeated [be32 hole][be16 n][n bytes] places each chunk `hole` bytes after
 * the previous one; a cut record ends the file where it stands.  The file is
 * capped at FSX_MAX bytes (bigger ones cost the parser's windows tens of MiB
 * per run and slowed the whole campaign tenfold).  Other inputs are the file itself.
 * (pytest_fastsnap/fuzz/extents.py is the same encoding in Python.) */
#define FSX_MAX (8ull << 20)   /* compacted real snapshots are ~3 MiB */

static void write_input(int fd, const uint8_t *data, size_t size)
{
    if (size < 4 || memcmp(data, "FSX1", 4) != 0) {
        put(fd, data, size, 0);
        return;
    }
    uint64_t pos = 0;
    size_t i = 4;
    while (i + 6 <= size) {
        uint64_t hole = (uint64_t)data[i] << 24 | (uint64_t)data[i + 1] << 16 |
                        (uint64_t)data[i + 2] << 8 | data[i + 3];
        size_t n = (size_t)data[i + 4] << 8 | data[i + 5];
        i += 6;
        if (n > size - i)
            n = size - i;
        if (pos + hole + n > FSX_MAX)
            break;
        pos += hole;
        put(fd, data + i, n, (off_t)pos);
        pos += n;
        i += n;
    }
    if (ftruncate(fd, (off_t)pos) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz_format", MFD_CLOEXEC);
    if (fd < 0)
        abort();
    write_input(fd, data, size);
    mr_snapshot snap;
    mr_error err;
    mr_limits limits;
    memset(&limits, 0, sizeof limits);
    limits.count = 1;
    strcpy(limits.item[0].id, "pc.ram");
    limits.item[0].max_length = 1ull << 40;
    int rc = mr_parse_auto(fd, NULL, &limits, &snap, NULL, &err); /* libvirt header too */
    if (rc == 0) {
        /* A valid parse must describe a consistent layout. */
        for (size_t i = 0; i < snap.nblocks; i++) {
            const mr_block *b = &snap.blocks[i];
            if (!b->ignored && (b->pages_offset + b->used_length > snap.file_size ||
                                b->bitmap_offset + b->bitmap_size > snap.file_size))
                abort();
        }
        if (snap.eof_offset >= snap.file_size || snap.dev_start > snap.eof_offset)
            abort();
        mr_snapshot_free(&snap);
    } else if (rc != -1 || strncmp(err.name, "E_", 2) != 0 || !err.msg[0] ||
               (mr_error_exit(err.name) != 2 && strcmp(err.name, E_INTERNAL) != 0)) {
        abort(); /* -1 with a named error: a format name, or E_INTERNAL */
    }
    close(fd);
    return 0;
}
