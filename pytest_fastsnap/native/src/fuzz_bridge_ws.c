/* libFuzzer harness for the bridge's working-set reader (br_ws_load in
 * bridge_ws.c, behind `serve --ws FILE`):
 *   clang -fsanitize=fuzzer,address,undefined fuzz_bridge_ws.c bridge_ws.c mr_*.c
 * The input is the file (in a memfd, read through /proc/self/fd), checked
 * against a fixed snapshot layout of two blocks (pc.ram 64 pages, pc.bios 4).
 * A file it accepts must list only existing pages, each once; a refusal
 * must carry E_WS (or E_INTERNAL for memory).  The trailing hash is fixed
 * up first, so mutations reach the checks behind it, unless the input's
 * last byte is 0x5a (then the hash check itself is exercised).  Not part of the loader
 * binary (loader.py skips fuzz_*.c). */
#define _GNU_SOURCE
#include "bridge_ws.h"
#include "mr_errors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct br_block blocks[2];
    memset(blocks, 0, sizeof blocks);
    memcpy(blocks[0].id, "pc.ram", 7);
    blocks[0].idlen = 6;
    blocks[0].npages = 64;
    blocks[0].length = 64 * 4096;
    memcpy(blocks[1].id, "pc.bios", 8);
    blocks[1].idlen = 7;
    blocks[1].npages = 4;
    blocks[1].length = 4 * 4096;
    struct br_snap snap;
    memset(&snap, 0, sizeof snap);
    snap.tps = 4096;
    snap.nblocks = 2;
    snap.blocks = blocks;

    int fd = memfd_create("ws", MFD_CLOEXEC);
    if (fd < 0)
        abort();
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        abort();
    memcpy(copy, data, size);
    if (size >= 8 && data[size - 1] != 0x5a) {
        uint64_t h = br_ws_hash(copy, size - 8);
        for (int i = 0; i < 8; i++)
            copy[size - 8 + (size_t)i] = (uint8_t)(h >> (8 * i));
    }
    for (size_t done = 0; done < size;) {
        ssize_t w = write(fd, copy + done, size - done);
        if (w <= 0)
            abort();
        done += (size_t)w;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    struct br_ws ws;
    mr_error err;
    memset(&err, 0, sizeof err);
    if (br_ws_load(&ws, &snap, path, &err) == 0) {
        unsigned char seen[68] = {0};
        for (uint64_t i = 0; i < ws.n; i++) {
            uint32_t b = ws.e[i].block;
            if (b >= 2 || ws.e[i].page >= blocks[b].npages)
                abort();
            size_t k = (size_t)(b * 64 + ws.e[i].page);
            if (seen[k]++)
                abort();
        }
        br_ws_free(&ws);
    } else if (strcmp(err.name, E_WS) != 0 && strcmp(err.name, E_INTERNAL) != 0) {
        abort();
    }
    close(fd);
    free(copy);
    return 0;
}
