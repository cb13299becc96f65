/* libFuzzer harness for the strict mapped-ram parser (mr_format.c):
 *   clang -fsanitize=fuzzer,address,undefined fuzz_format.c mr_format.c
 * Each input is written to a memfd and parsed with stream offset 0; any
 * crash, sanitizer report, leak or timeout is a bug.  Not part of the
 * loader binary (loader.py skips fuzz_*.c). */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mr_format.h"
#include "mr_libvirt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz_format", MFD_CLOEXEC);
    if (fd < 0)
        abort();
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0)
            abort();
        done += (size_t)w;
    }
    mr_snapshot snap;
    mr_error err;
    mr_limits limits;
    memset(&limits, 0, sizeof limits);
    limits.count = 1;
    strcpy(limits.item[0].id, "pc.ram");
    limits.item[0].max_length = 1ull << 40;
    int rc = mr_parse_auto(fd, NULL, &limits, &snap, NULL, &err); /* libvirt header too */
    if (rc == MR_OK) {
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
    } else if (rc == MR_INVALID) {
        if (strncmp(err.name, "E_", 2) != 0 || !err.msg[0])
            abort();
    }
    close(fd);
    return 0;
}
