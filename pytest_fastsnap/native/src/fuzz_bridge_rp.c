/* libFuzzer harness for the postcopy bridge's return-path message parser
 * (rp_main in bridge.c: SHUT, PONG, REQ_PAGES, REQ_PAGES_ID from QEMU, and
 * in a --resume run RECV_BITMAP with its out-of-frame bitmap and RESUME_ACK,
 * parsed by bridge_resume.c):
 *   clang -fsanitize=fuzzer,address,undefined fuzz_bridge_rp.c bridge_snap.c
 *         bridge_resume.c mr_*.c
 * bridge.c is included so its static parser runs as is, on a socketpair
 * holding the input, against a snapshot of two blocks, as a resumed bridge
 * that has sent POSTCOPY_RESUME.  Every request it queues must lie inside
 * its block, page aligned; bitmaps claim only pages inside their block and
 * at most once; it must stop at EOF.
 * Not part of the loader binary (loader.py skips fuzz_*.c). */
#include "bridge.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define PS 4096u

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 65536)
        return 0;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        abort();
    int buf = 1 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    for (size_t done = 0; done < size;) {
        ssize_t w = send(sv[1], data + done, size - done, MSG_NOSIGNAL);
        if (w <= 0)
            abort();
        done += (size_t)w;
    }
    shutdown(sv[1], SHUT_WR);

    static struct br_block blocks[2];
    memset(blocks, 0, sizeof blocks);
    strcpy(blocks[0].id, "pc.ram");
    blocks[0].idlen = 6;
    blocks[0].length = 64 * PS;
    strcpy(blocks[1].id, "pc.bios");
    blocks[1].idlen = 7;
    blocks[1].length = 16 * PS;

    mr_core_block core[2];
    memset(core, 0, sizeof core);
    for (int i = 0; i < 2; i++) {
        blocks[i].npages = blocks[i].length / PS;
        core[i].num_pages = blocks[i].npages;
        core[i].nwords = (blocks[i].npages + 63) / 64;
        core[i].file_bits = calloc(core[i].nwords, sizeof(uint64_t));
        core[i].claimed = calloc(core[i].nwords, sizeof(uint64_t));
        if (!core[i].file_bits || !core[i].claimed)
            abort();
        core[i].file_bits[0] = 0x5555555555555555ull;  /* every other page has data */
        blocks[i].core = &core[i];
    }

    struct bridge *b = calloc(1, sizeof *b);
    if (!b)
        abort();
    b->resume.active = 1;
    b->resume.resume_sent = 1;
    if (br_resume_init(&b->resume, 2, &b->err) < 0)
        abort();
    b->sock = sv[0];
    b->snap.tps = PS;
    b->snap.nblocks = 2;
    b->snap.blocks = blocks;
    pthread_mutex_init(&b->rp_lock, NULL);
    pthread_cond_init(&b->rp_cond, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b->t_start);

    rp_main(b);

    if (atomic_load(&b->rp_state) == 0)
        abort();    /* it returned, so the return path must be shut or closed */
    for (size_t i = 0; i < b->q_len; i++) {
        const struct rp_req *r = &b->q[(b->q_head + i) % b->q_cap];
        if (r->block >= 2)
            abort();
        const struct br_block *blk = &blocks[r->block];
        if (r->len == 0 || r->start % PS || r->start >= blk->length ||
            r->len > blk->length - r->start)
            abort();
    }
    uint64_t claimed = 0;
    for (int i = 0; i < 2; i++) {
        for (uint64_t w = 0; w < core[i].nwords; w++) {
            uint64_t word = atomic_load(&core[i].claimed[w]);
            if (w == core[i].nwords - 1 && blocks[i].npages % 64 &&
                word >> (blocks[i].npages % 64))
                abort();    /* a claim past the block's last page */
            claimed += (uint64_t)__builtin_popcountll(word);
        }
    }
    if (b->resume.ngot > 2 || b->resume.pages_present > claimed ||
        b->resume.pages_present_zero > b->resume.pages_present)
        abort();
    for (int i = 0; i < 2; i++) {
        free(core[i].file_bits);
        free((void *)core[i].claimed);
    }
    br_resume_free(&b->resume);
    free(b->q);
    pthread_mutex_destroy(&b->rp_lock);
    pthread_cond_destroy(&b->rp_cond);
    free(b);
    close(sv[0]);
    close(sv[1]);
    return 0;
}
