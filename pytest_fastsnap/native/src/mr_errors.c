/* Owns filling the error context (see mr_errors.h for names and exit codes). */
#include "mr_errors.h"

#include <stdio.h>

int mr_error_vset(mr_error *e, const char *name, const char *fmt, va_list ap)
{
    snprintf(e->name, sizeof e->name, "%s", name);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    return -1;
}

int mr_error_set(mr_error *e, const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mr_error_vset(e, name, fmt, ap);
    va_end(ap);
    return -1;
}
