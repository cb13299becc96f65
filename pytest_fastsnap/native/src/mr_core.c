/* Owns reading the file bitmaps into per-block page state (see mr_core.h). */
#define _GNU_SOURCE
#include "mr_core.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int mr_core_init(int fd, const mr_snapshot *snap, mr_core_block *blocks)
{
    for (size_t i = 0; i < snap->nblocks; i++) {
        mr_core_block *b = &blocks[i];
        const mr_block *m = &snap->blocks[i];
        memset(b, 0, sizeof *b);
        b->meta = m;
        b->num_pages = m->num_pages;
        b->nwords = (m->num_pages + 63) / 64;
        size_t words = b->nwords ? (size_t)b->nwords : 1;
        b->file_bits = calloc(words, sizeof(uint64_t));
        b->claimed = calloc(words, sizeof(uint64_t));
        b->loads = calloc(m->num_pages ? (size_t)m->num_pages : 1, 1);
        if (!b->file_bits || !b->claimed || !b->loads)
            return errno = ENOMEM, -1;
        if (m->ignored)
            continue;
        /* bitmap_size == nwords * 8 bytes, validated to lie inside the file. */
        unsigned char *raw = malloc((size_t)m->bitmap_size);
        if (!raw)
            return errno = ENOMEM, -1;
        size_t got = 0;
        while (got < m->bitmap_size) {
            ssize_t r = pread(fd, raw + got, (size_t)m->bitmap_size - got,
                              (off_t)(m->bitmap_offset + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                free(raw);
                if (r == 0)
                    errno = EIO;
                return -1;
            }
            got += (size_t)r;
        }
        for (uint64_t w = 0; w < b->nwords; w++) {
            uint64_t v = 0;
            for (int k = 7; k >= 0; k--)
                v = v << 8 | raw[w * 8 + (uint64_t)k];
            b->file_bits[w] = v;
        }
        free(raw);
        if (m->num_pages % 64)
            b->file_bits[b->nwords - 1] &= (1ull << (m->num_pages % 64)) - 1;
    }
    return 0;
}

uint64_t mr_core_set_pages(const mr_core_block *b)
{
    uint64_t n = 0;
    for (uint64_t w = 0; w < b->nwords; w++)
        n += (uint64_t)__builtin_popcountll(b->file_bits[w]);
    return n;
}

void mr_core_free(mr_core_block *blocks, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(blocks[i].file_bits);
        free((void *)blocks[i].claimed);
        free((void *)blocks[i].loads);
    }
}
