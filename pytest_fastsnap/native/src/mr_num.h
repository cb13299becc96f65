/* Strict number parsing for command-line options: the whole string must be
 * the number (no sign for unsigned values, no trailing bytes, no overflow). */
#ifndef FASTSNAP_MR_NUM_H
#define FASTSNAP_MR_NUM_H

#include <stdint.h>

/* Decimal, 0x hex or 0 octal; 0, or -1 if s is not exactly such a number. */
int mr_parse_u64(const char *s, uint64_t *out);
/* Like mr_parse_u64, with an optional K/M/G/T suffix (powers of 1024, either
 * case), refused if the result overflows 64 bits. */
int mr_parse_size(const char *s, uint64_t *out);
/* A finite decimal number in [lo, hi]; 0, or -1 otherwise. */
int mr_parse_double(const char *s, double lo, double hi, double *out);

#endif
