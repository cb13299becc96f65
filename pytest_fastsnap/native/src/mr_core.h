/* Owns per-page state and the only bitmap bit helpers of the loader (the
 * local loader, the bridge and inspect all go through these).
 *
 * Per-block page state for restores: the file bitmap (loaded after the
 * snapshot was validated) and an atomic "claimed" bitmap: whoever sets a
 * page's claimed bit first (atomic_fetch_or on its 64-bit word) loads that
 * page, exactly once.  A per-page load counter is a debug check: a second
 * load of the same page is counted in double_loads (must stay 0). */
#ifndef FASTSNAP_MR_CORE_H
#define FASTSNAP_MR_CORE_H

#include <stdatomic.h>
#include <stdint.h>

#include "mr_format.h"

typedef struct mr_core_block {
    const mr_block *meta;
    uint64_t num_pages;
    uint64_t nwords;
    uint64_t *file_bits;            /* bit i: page i has data in the file */
    _Atomic uint64_t *claimed;      /* bit i: some thread owns loading page i */
    _Atomic unsigned char *loads;   /* loads of page i (debug: must end at 1) */
    unsigned char *mem;             /* restored memory (mr_local) */
} mr_core_block;

/* Reads and unpacks each block's bitmap (bit i = bit i%8 of byte i/8);
 * bits past num_pages are ignored.  0 ok, -1 with errno. */
int mr_core_init(int fd, const mr_snapshot *snap, mr_core_block *blocks);
void mr_core_free(mr_core_block *blocks, size_t n);

/* Pages with data in the file (bits set in the file bitmap). */
uint64_t mr_core_set_pages(const mr_core_block *b);

/* 64-page words, for loops that skip whole words: bit i of word w is page 64*w+i. */
static inline uint64_t mr_core_file_word(const mr_core_block *b, uint64_t page)
{
    return b->file_bits[page / 64];
}

static inline uint64_t mr_core_claimed_word(mr_core_block *b, uint64_t page)
{
    return atomic_load_explicit(&b->claimed[page / 64], memory_order_relaxed);
}

static inline int mr_core_bit(const mr_core_block *b, uint64_t page)
{
    return (int)(b->file_bits[page / 64] >> (page % 64) & 1);
}

/* 1 if the caller now owns page (it was unclaimed), 0 if someone else does. */
static inline int mr_core_claim(mr_core_block *b, uint64_t page)
{
    uint64_t mask = 1ull << (page % 64);
    return !(atomic_fetch_or(&b->claimed[page / 64], mask) & mask);
}

static inline int mr_core_is_claimed(mr_core_block *b, uint64_t page)
{
    return (int)(mr_core_claimed_word(b, page) >> (page % 64) & 1);
}

/* Record that page was placed; returns 1 if it had been placed before (a double load). */
static inline int mr_core_mark_loaded(mr_core_block *b, uint64_t page)
{
    return atomic_fetch_add(&b->loads[page], 1) != 0;
}

#endif
