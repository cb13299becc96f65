/* The loader's one JSON string writer (every subcommand's --json output). */
#ifndef FASTSNAP_MR_JSON_H
#define FASTSNAP_MR_JSON_H

#include <stdio.h>

/* Writes s as a JSON string literal: '"' and '\\' escaped, control bytes
 * and every byte >= 0x7f as \u00XX, so the output is ASCII and valid JSON
 * for any byte string (a byte reads back as the Latin-1 character, as the
 * Python reader decodes block ids).  NULL writes null. */
void mr_json_string(FILE *out, const char *s);

#endif
