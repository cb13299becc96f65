/* Owns strict option number parsing (see mr_num.h). */
#include "mr_num.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int parse_number(const char *s, uint64_t *out, int suffixes)
{
    char *end;
    if (!s || !isdigit((unsigned char)*s))
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno)
        return -1;
    if (suffixes && *end) {
        static const char units[] = "KMGT";
        const char *u = strchr(units, toupper((unsigned char)*end));
        if (!u || end[1])
            return -1;
        unsigned shift = 10u * (unsigned)(u - units + 1);
        if (v > (UINT64_MAX >> shift))
            return -1;
        v <<= shift;
        end++;
    }
    if (*end)
        return -1;
    *out = v;
    return 0;
}

int mr_parse_u64(const char *s, uint64_t *out)
{
    return parse_number(s, out, 0);
}

int mr_parse_size(const char *s, uint64_t *out)
{
    return parse_number(s, out, 1);
}

int mr_parse_double(const char *s, double lo, double hi, double *out)
{
    char *end;
    if (!s || !*s || isspace((unsigned char)*s))
        return -1;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v) || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}
