/* `inspect --json` view of a libvirt save image header (mr_libvirt.h); apart
 * from mr_libvirt.c so the parser links without mr_local.c (fuzz harness). */
#include <inttypes.h>
#include <stdio.h>

#include "mr_libvirt.h"
#include "mr_local.h" /* mr_json_string */

void mr_libvirt_json(FILE *out, const mr_libvirt *lv)
{
    if (!lv->present) {
        fputs("null", out);
        return;
    }
    fputs("{\"domain\":", out);
    mr_json_string(out, lv->domain_name);
    fprintf(out, ",\"version\":%" PRIu32 ",\"format\":", lv->version);
    mr_json_string(out, mr_libvirt_format_name(lv->format));
    fprintf(out, ",\"format_id\":%" PRIu32 ",\"was_running\":%s,\"data_len\":%" PRIu32
            ",\"cookie_offset\":%" PRIu32 ",\"xml_length\":%" PRIu64 ",\"stream_offset\":%"
            PRIu64 "}", lv->format, lv->was_running ? "true" : "false", lv->data_len,
            lv->cookie_offset, lv->xml_len, lv->stream_offset);
}
