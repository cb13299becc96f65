/* Minimal SHA-256 (FIPS 180-4) for restored-memory digests. */
#ifndef FASTSNAP_MR_SHA256_H
#define FASTSNAP_MR_SHA256_H
#include <stddef.h>
#include <stdint.h>

typedef struct mr_sha256 {
    uint32_t h[8];
    uint64_t len;
    unsigned char buf[64];
    size_t used;
} mr_sha256;

void mr_sha256_init(mr_sha256 *s);
void mr_sha256_update(mr_sha256 *s, const void *data, size_t n);
void mr_sha256_final(mr_sha256 *s, unsigned char out[32]);
void mr_sha256_hex(const unsigned char dig[32], char out[65]);
#endif
