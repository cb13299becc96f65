/*
 * fastsnap tiny guest: fills a guest-physical range with a known pattern and
 * answers single-byte commands on COM1.  The pattern is mirrored exactly by
 * pytest_fastsnap/guests/pattern.py; change both or neither.
 *
 * Pattern (all words 64-bit little-endian, 512 words per 4 KiB page):
 *   mix(x)        = splitmix64 finaliser of x + 0x9E3779B97F4A7C15
 *   T[i]          = mix(seed + i * 0xD1B54A32D192ED03)          (per seed)
 *   zero(pfn)     = (zevery && pfn % zevery == 0) || (mix(seed ^ pfn) >> 48) < zthresh
 *   h(pfn, gen)   = mix(mix(seed ^ pfn) + gen)
 *   page word 0   = gen;  word i (1..511) = T[i] ^ h(pfn, gen)
 *   zero pages are all zero and never written again.
 *   dirty set     = non-zero pages with pfn % dstride == 0 (mode=dirty only)
 * In mode=dirty the guest rewrites the dirty set in ascending pfn order, pass
 * after pass, pass p writing generation p (the initial fill is generation 0).
 *
 * Console: boot prints "FASTSNAP-TINY BOOT", then after the fill
 * "FASTSNAP-TINY READY ...".  Commands (one byte each, others ignored):
 *   C  check the whole range:  "CHECK OK pages=N gen=P"  or
 *      "CHECK FAIL page=PFN addr=0x... why=zero|content|gen gen=G want=W"
 *   P  "PONG n=<pings> gen=<pass>"
 *   S  stop dirtying:          "STOPPED gen=P cursor=0x..."
 *   D  (re)start dirtying:     "DIRTYING gen=P"
 *   I  print the READY line again
 *   0-9  digits of the argument of the next T or R (the digits are kept
 *        until T or R consumes them; another byte does not reset them)
 *   T  touch: read and check the first N per mille of the range's pages in
 *      ascending order (N = the digits before it, at most 1000; none: 1000)
 *   R  the same for N per mille of the pages in a fixed pseudo-random order
 *      (a permutation of the range, seeded by the pattern seed), each at
 *      most once: "TOUCH OK order=seq|rand permille=N pages=K gen=P <timing>" or
 *      "TOUCH FAIL page=PFN addr=0x... why=... gen=G want=W" (as CHECK)
 *
 * Timing (TOUCH OK's <timing>): the first read of every touched page is
 * timed with rdtsc, converted with the TSC rate calibrated at boot against
 * PIT channel 0 (5 ms; under TCG both the TSC and the PIT follow host time):
 *   us=TOTAL tsc_khz=F lat_thresh_us=10 faulted=N
 *   lat_p50_us=A lat_p90_us=B lat_p99_us=C lat_max_us=D lat_res=16
 * faulted: reads slower than lat_thresh_us (a page the destination had to
 * fetch); the percentiles and max are of those reads only (0 when none).
 * Percentiles come from a histogram exact to 1 us below 64 us and with 16
 * buckets per power of two above (lat_res=16: a value is its bucket's lower
 * bound, at most 1/16 low); max is exact.  tsc_khz=0: no PIT answered, so
 * every us figure is raw TSC cycles / 1000 instead.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define PAGE 4096u
#define WORDS (PAGE / 8)
#define COM1 0x3F8

extern char _end[];

/* -- I/O ------------------------------------------------------------------ */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void mmio_write(u32 addr, u32 v) { *(volatile u32 *)addr = v; }

static void putc_(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (u8)c);
}

static void puts_(const char *s)
{
    while (*s) {
        if (*s == '\n')
            putc_('\r');
        putc_(*s++);
    }
}

static void puthex(u64 v)
{
    char buf[19];
    int n = 0;
    puts_("0x");
    do {
        buf[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    while (n)
        putc_(buf[--n]);
}

/* 64-bit by 32-bit with two divl steps: no libgcc needed.  *v becomes the
 * quotient; returns the remainder. */
static u32 divmod32(u64 *v, u32 d)
{
    u32 hi = (u32)(*v >> 32), lo = (u32)*v, qhi = hi / d, rem = hi % d, qlo;
    __asm__("divl %4" : "=a"(qlo), "=d"(rem) : "a"(lo), "d"(rem), "r"(d));
    *v = ((u64)qhi << 32) | qlo;
    return rem;
}

static u32 divmod10(u64 *v) { return divmod32(v, 10); }

static void putdec(u64 v)
{
    char buf[21];
    int n = 0;
    do
        buf[n++] = (char)('0' + divmod10(&v));
    while (v);
    while (n)
        putc_(buf[--n]);
}


/* -- timing ----------------------------------------------------------------- */

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

#define PIT_HZ 1193182u
#define CAL_TICKS 5966u          /* 5 ms of PIT ticks */
static u32 tsc_khz;              /* 0: no PIT answered (figures are cycles / 1000) */

static u32 pit_read0(void)
{
    outb(0x43, 0x00);            /* latch channel 0 */
    u32 lo = inb(0x40);
    return lo | ((u32)inb(0x40) << 8);
}

/* TSC kHz against PIT channel 0 (mode 2, reload 65536; IRQ0 is masked). */
static void calibrate_tsc(void)
{
    outb(0x43, 0x34);
    outb(0x40, 0);
    outb(0x40, 0);
    u32 prev = pit_read0(), elapsed = 0, spins = 0;
    u64 t0 = rdtsc();
    while (elapsed < CAL_TICKS) {
        u32 now = pit_read0();
        elapsed += (prev - now) & 0xFFFFu;
        prev = now;
        if (++spins > 200000u)  /* a PIT that never moves: give up */
            return;
    }
    u64 cycles = (rdtsc() - t0) * PIT_HZ;
    divmod32(&cycles, elapsed * 1000u);
    tsc_khz = (u32)cycles;
}

/* Cycles to microseconds (cycles / 1000 when the rate is unknown). */
static u32 cycles_to_us(u64 cycles)
{
    cycles *= 1000u;
    divmod32(&cycles, tsc_khz ? tsc_khz : 1000000u);
    return cycles > 0xFFFFFFFFull ? 0xFFFFFFFFu : (u32)cycles;
}

/* Latency histogram: exact below 64 us, then 16 buckets per power of two. */
#define LAT_THRESH_US 10u
#define LAT_EXACT 64u
#define LAT_SUB 16u
#define LAT_BUCKETS (LAT_EXACT + (32u - 6u) * LAT_SUB)
static u32 lat_hist[LAT_BUCKETS];
static u32 lat_count, lat_max;

static u32 lat_bucket(u32 us)
{
    if (us < LAT_EXACT)
        return us;
    u32 e = 31u - (u32)__builtin_clz(us);           /* >= 6 */
    return LAT_EXACT + (e - 6u) * LAT_SUB + ((us >> (e - 4u)) & (LAT_SUB - 1u));
}

static u32 lat_bucket_low(u32 b)
{
    if (b < LAT_EXACT)
        return b;
    u32 e = (b - LAT_EXACT) / LAT_SUB + 6u, sub = (b - LAT_EXACT) % LAT_SUB;
    return (1u << e) | (sub << (e - 4u));
}

static void lat_reset(void)
{
    for (u32 i = 0; i < LAT_BUCKETS; i++)
        lat_hist[i] = 0;
    lat_count = lat_max = 0;
}

static void lat_add(u32 us)
{
    if (us <= LAT_THRESH_US)
        return;
    lat_hist[lat_bucket(us)]++;
    lat_count++;
    if (us > lat_max)
        lat_max = us;
}

/* The pct-th percentile (nearest rank) of the recorded latencies. */
static u32 lat_pct(u32 pct)
{
    if (!lat_count)
        return 0;
    u64 r = (u64)lat_count * pct + 99u;
    divmod32(&r, 100u);
    u32 rank = (u32)r, seen = 0;
    for (u32 b = 0; b < LAT_BUCKETS; b++) {
        seen += lat_hist[b];
        if (seen >= rank)
            return lat_bucket_low(b);
    }
    return lat_max;
}

static void put_field(const char *name, u64 v)
{
    puts_(name);
    putdec(v);
}

/* -- pattern -------------------------------------------------------------- */

static u64 mix(u64 z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static u64 seed;
static u32 start_pfn, npages, zevery, zthresh, dstride = 8, dirty_mode, dirtying;
static u64 table[WORDS];
static u64 pass;          /* generation being written; 0 = initial fill only */
static u32 cursor;        /* next dirty pfn to write in this pass */
static u32 nzero, ndirty, npings;

static int is_zero(u32 pfn)
{
    if (zevery && pfn % zevery == 0)
        return 1;
    return (u32)(mix(seed ^ pfn) >> 48) < zthresh;
}

static int is_dirty(u32 pfn)
{
    return dirty_mode && pfn % dstride == 0 && !is_zero(pfn);
}

static void fill_page(u32 pfn, u64 gen)
{
    u64 h = mix(mix(seed ^ pfn) + gen);
    volatile u32 *p = (volatile u32 *)(pfn * PAGE);
    u32 hlo = (u32)h, hhi = (u32)(h >> 32);
    const u32 *t = (const u32 *)table;
    for (u32 i = 2; i < 2 * WORDS; i += 2) {
        p[i] = t[i] ^ hlo;
        p[i + 1] = t[i + 1] ^ hhi;
    }
    p[0] = (u32)gen;
    p[1] = (u32)(gen >> 32);
}

static void zero_page(u32 pfn)
{
    u32 *p = (u32 *)(pfn * PAGE);
    for (u32 i = 0; i < PAGE / 4; i++)
        if (p[i]) {
            for (u32 j = 0; j < PAGE / 4; j++)
                ((volatile u32 *)p)[j] = 0;
            return;
        }
}

/* The generation a page must hold now. */
static u64 want_gen(u32 pfn)
{
    if (!is_dirty(pfn) || pass == 0)
        return 0;
    return pfn < cursor ? pass : pass - 1;
}

/* Check one page against the pattern; 0 if good, else print a FAIL line
 * starting with `what` ("CHECK" or "TOUCH") and return 1. */
static int check_page(u32 pfn, const char *what)
{
    const u32 *p = (const u32 *)(pfn * PAGE);
    const char *why = 0;
    u64 gen = 0, want = 0;
    if (is_zero(pfn)) {
        for (u32 i = 0; i < PAGE / 4 && !why; i++)
            if (p[i])
                why = "zero";
    } else {
        gen = p[0] | ((u64)p[1] << 32);
        want = want_gen(pfn);
        u64 h = mix(mix(seed ^ pfn) + gen);
        u32 hlo = (u32)h, hhi = (u32)(h >> 32);
        const u32 *t = (const u32 *)table;
        for (u32 i = 2; i < 2 * WORDS && !why; i += 2)
            if (p[i] != (t[i] ^ hlo) || p[i + 1] != (t[i + 1] ^ hhi))
                why = "content";
        if (!why && gen != want)
            why = "gen";
    }
    if (!why)
        return 0;
    puts_(what);
    puts_(" FAIL page=");
    putdec(pfn);
    puts_(" addr=");
    puthex((u64)pfn * PAGE);
    puts_(" why=");
    puts_(why);
    puts_(" gen=");
    putdec(gen);
    puts_(" want=");
    putdec(want);
    puts_("\n");
    return 1;
}

static void check(void)
{
    for (u32 pfn = start_pfn; pfn < start_pfn + npages; pfn++)
        if (check_page(pfn, "CHECK"))
            return;
    puts_("CHECK OK pages=");
    putdec(npages);
    puts_(" gen=");
    putdec(pass);
    puts_("\n");
}

/* A bijection on [0, 2^bits): odd multipliers and xor-shifts are invertible
 * modulo 2^bits.  Cycle-walking it restricts it to [0, npages). */
static u32 permute(u32 x, u32 bits)
{
    u32 mask = bits >= 32 ? 0xFFFFFFFFu : (1u << bits) - 1, k = (u32)mix(seed) | 1u;
    for (int round = 0; round < 3; round++) {
        x = (x * k) & mask;
        x ^= x >> (bits / 2 + 1);
        x = (x + (u32)(seed >> 32)) & mask;
    }
    return x;
}

static u32 touch_arg = 1000, touch_digits;

/* The workload: read and check `touch_arg` per mille of the pages, in
 * order or pseudo-randomly (each page at most once). */
static void touch(int random)
{
    u32 permille = touch_digits ? touch_arg : 1000;
    touch_arg = 0;
    touch_digits = 0;
    if (permille > 1000) {
        puts_("TOUCH FAIL why=permille-over-1000\n");
        return;
    }
    u32 count = npages / 1000 * permille + npages % 1000 * permille / 1000;
    u32 bits = 0;
    while (bits < 32 && (1u << bits) < npages)
        bits++;
    u32 x = 0;
    lat_reset();
    u64 start = rdtsc();
    for (u32 i = 0; i < count; i++) {
        u32 idx = i;
        if (random) {
            do
                idx = permute(x++, bits);
            while (idx >= npages);
        }
        /* time the page's first read: a missing page blocks the vCPU here */
        const volatile u32 *first = (const volatile u32 *)((start_pfn + idx) * PAGE);
        u64 t0 = rdtsc();
        (void)*first;
        lat_add(cycles_to_us(rdtsc() - t0));
        if (check_page(start_pfn + idx, "TOUCH"))
            return;
    }
    u32 total_us = cycles_to_us(rdtsc() - start);
    puts_("TOUCH OK order=");
    puts_(random ? "rand" : "seq");
    put_field(" permille=", permille);
    put_field(" pages=", count);
    put_field(" gen=", pass);
    put_field(" us=", total_us);
    put_field(" tsc_khz=", tsc_khz);
    put_field(" lat_thresh_us=", LAT_THRESH_US);
    put_field(" faulted=", lat_count);
    put_field(" lat_p50_us=", lat_pct(50));
    put_field(" lat_p90_us=", lat_pct(90));
    put_field(" lat_p99_us=", lat_pct(99));
    put_field(" lat_max_us=", lat_max);
    put_field(" lat_res=", LAT_SUB);
    puts_("\n");
}

/* -- command line ----------------------------------------------------------- */

static char cmdline[1024];

static int streq(const char *a, const char *b, u32 n)
{
    for (u32 i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return b[n] == 0;
}

static int parse_num(const char *s, u32 n, u64 *out)
{
    u64 v = 0;
    u32 base = 10, i = 0;
    if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        i = 2;
    }
    if (i == n)
        return 0;
    for (; i < n; i++) {
        char c = s[i];
        u32 d;
        if (c >= '0' && c <= '9')
            d = (u32)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (u32)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (u32)(c - 'A' + 10);
        else
            return 0;
        v = base == 16 ? (v << 4) | d : (v << 3) + (v << 1) + d;
    }
    *out = v;
    return 1;
}

static void fatal(const char *what, const char *detail, u32 n)
{
    puts_("FASTSNAP-TINY ERROR ");
    puts_(what);
    if (detail) {
        puts_(": ");
        for (u32 i = 0; i < n; i++)
            putc_(detail[i]);
    }
    puts_("\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}

static u64 start_addr = 0x400000, size = 0x1000000;

static void parse_cmdline(void)
{
    const char *s = cmdline;
    while (*s) {
        while (*s == ' ')
            s++;
        const char *key = s;
        while (*s && *s != ' ' && *s != '=')
            s++;
        u32 klen = (u32)(s - key);
        if (!klen)
            break;
        if (*s != '=') {
            continue; /* a bare word (e.g. the kernel path some loaders prepend) */
        }
        const char *val = ++s;
        while (*s && *s != ' ')
            s++;
        u32 vlen = (u32)(s - val);
        u64 v = 0;
        if (streq(key, "mode", klen)) {
            if (streq(val, "static", vlen))
                dirty_mode = 0;
            else if (streq(val, "dirty", vlen))
                dirty_mode = 1;
            else
                fatal("bad mode", val, vlen);
            continue;
        }
        if (!parse_num(val, vlen, &v))
            fatal("bad number", key, klen + 1 + vlen);
        if (streq(key, "seed", klen))
            seed = v;
        else if (streq(key, "start", klen))
            start_addr = v;
        else if (streq(key, "size", klen))
            size = v;
        else if (streq(key, "zthresh", klen) && v <= 65536)
            zthresh = (u32)v;
        else if (streq(key, "zevery", klen) && v < 0x100000000ull)
            zevery = (u32)v;
        else if (streq(key, "dstride", klen) && v >= 1 && v < 0x100000000ull)
            dstride = (u32)v;
        else
            fatal("bad parameter", key, klen + 1 + vlen);
    }
}

/* -- multiboot ---------------------------------------------------------------- */

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr;
};

struct mb_mmap {
    u32 size;
    u64 addr, len;
    u32 type;
} __attribute__((packed));

/* Is [start, end) inside one usable RAM region? */
static int range_is_ram(const struct mb_info *mbi, u64 start, u64 end)
{
    if (mbi->flags & (1u << 6)) {
        u32 p = mbi->mmap_addr;
        while (p < mbi->mmap_addr + mbi->mmap_length) {
            const struct mb_mmap *m = (const struct mb_mmap *)p;
            if (m->type == 1 && m->addr <= start && end <= m->addr + m->len)
                return 1;
            p += m->size + 4;
        }
        return 0;
    }
    if (mbi->flags & 1u)
        return start >= 0x100000 && end <= 0x100000 + (u64)mbi->mem_upper * 1024;
    return 0;
}

/* -- interrupts ------------------------------------------------------------------ */

struct idt_entry {
    u16 off_lo, sel;
    u8 zero, attr;
    u16 off_hi;
} __attribute__((packed));

static struct idt_entry idt[48];

#define ISR(n) extern void isr##n(void);
ISR(0) ISR(1) ISR(2) ISR(3) ISR(4) ISR(5) ISR(6) ISR(7) ISR(8) ISR(9) ISR(10) ISR(11)
ISR(12) ISR(13) ISR(14) ISR(15) ISR(16) ISR(17) ISR(18) ISR(19) ISR(20) ISR(32) ISR(33)
ISR(34) ISR(35) ISR(36) ISR(37) ISR(38) ISR(39) ISR(40) ISR(41) ISR(42) ISR(43) ISR(44)
ISR(45) ISR(46) ISR(47)

static void (*const isrs[48])(void) = {
    isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7, isr8, isr9, isr10, isr11, isr12, isr13,
    isr14, isr15, isr16, isr17, isr18, isr19, isr20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    isr32, isr33, isr34, isr35, isr36, isr37, isr38, isr39, isr40, isr41, isr42, isr43,
    isr44, isr45, isr46, isr47,
};

/*
 * Interrupts are enabled only inside the idle loop's "sti; hlt", so an
 * interrupt never lands in the middle of anything: its handler queues the
 * received bytes, sends EOI and restarts the main loop on a fresh stack
 * instead of returning with iret.  (Nested KVM here is kvm-pvm, which
 * emulates a 32-bit protected-mode iret with "emulation failure".)
 */
void tiny_interrupt(u32 vec)
{
    if (vec < 32) {
        puts_("FASTSNAP-TINY FAULT vector=");
        putdec(vec);
        puts_("\n");
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    if (vec >= 40)
        outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

static void setup_interrupts(void)
{
    for (u32 i = 0; i < 48; i++) {
        u32 off = (u32)isrs[i];
        if (!off)
            continue;
        idt[i].off_lo = (u16)off;
        idt[i].off_hi = (u16)(off >> 16);
        idt[i].sel = 0x08;
        idt[i].attr = 0x8E;
    }
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) desc = {sizeof(idt) - 1, (u32)idt};
    __asm__ volatile("lidt %0" : : "m"(desc));

    /* 8259s: vectors 0x20-0x2f, only IRQ4 (COM1) unmasked. */
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 0x20);
    outb(0xA1, 0x28);
    outb(0x21, 4);
    outb(0xA1, 2);
    outb(0x21, 1);
    outb(0xA1, 1);
    outb(0x21, 0xEF);
    outb(0xA1, 0xFF);

    /* Local APIC in virtual-wire mode, so the 8259 reaches the CPU whatever
     * the firmware (SeaBIOS or qboot) left behind. */
    mmio_write(0xFEE000F0, 0x1FF);  /* spurious vector 0xff, APIC enabled */
    mmio_write(0xFEE00350, 0x700);  /* LINT0: ExtINT */
    mmio_write(0xFEE00360, 0x400);  /* LINT1: NMI */

    /* COM1: 115200 8N1, FIFO, receive interrupt, OUT2 gates the IRQ line. */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1 + 0, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0x07);
    outb(COM1 + 4, 0x0B);
    while (inb(COM1 + 5) & 1)
        (void)inb(COM1);
    outb(COM1 + 1, 0x01);
}

static int getc_nowait(void)
{
    if (inb(COM1 + 5) & 1)
        return inb(COM1);
    return -1;
}

/* -- main ---------------------------------------------------------------------- */

static void ready_line(void)
{
    puts_("FASTSNAP-TINY READY mode=");
    puts_(dirty_mode ? "dirty" : "static");
    puts_(" seed=");
    puthex(seed);
    puts_(" start=");
    puthex(start_addr);
    puts_(" size=");
    puthex(size);
    puts_(" pages=");
    putdec(npages);
    puts_(" zero=");
    putdec(nzero);
    puts_(" dirty=");
    putdec(ndirty);
    puts_(" tsc_khz=");
    putdec(tsc_khz);
    puts_("\n");
}

static void command(int c)
{
    switch (c) {
    case 'C':
        check();
        break;
    case 'P':
        npings++;
        puts_("PONG n=");
        putdec(npings);
        puts_(" gen=");
        putdec(pass);
        puts_("\n");
        break;
    case 'S':
        dirtying = 0;
        puts_("STOPPED gen=");
        putdec(pass);
        puts_(" cursor=");
        puthex((u64)cursor * PAGE);
        puts_("\n");
        break;
    case 'D':
        dirtying = dirty_mode && ndirty;
        puts_(dirtying ? "DIRTYING gen=" : "NOT-DIRTYING gen=");
        putdec(pass);
        puts_("\n");
        break;
    case 'I':
        ready_line();
        break;
    case 'T':
    case 'R':
        touch(c == 'R');
        break;
    default:
        if (c >= '0' && c <= '9') {
            touch_arg = touch_digits ? touch_arg * 10 + (u32)(c - '0') : (u32)(c - '0');
            if (touch_arg > 100000)
                touch_arg = 100000;     /* refused as over 1000 by touch() */
            touch_digits = 1;
        }
        break;
    }
}

/* Write the next dirty page; start a new pass after the last one. */
static void dirty_step(void)
{
    u32 end = start_pfn + npages;
    while (cursor < end && !is_dirty(cursor))
        cursor++;
    if (cursor >= end) {
        pass++;
        cursor = start_pfn;
        while (!is_dirty(cursor))
            cursor++;
    }
    /* cursor < end: ndirty > 0 */
    fill_page(cursor, pass);
    cursor++;
}

void tiny_loop(void);

void tiny_main(u32 magic, const struct mb_info *mbi)
{
    setup_interrupts();
    calibrate_tsc();
    puts_("FASTSNAP-TINY BOOT\n");
    if (magic != 0x2BADB002)
        fatal("not booted by a multiboot loader", 0, 0);
    if (mbi->flags & (1u << 2)) {
        const char *s = (const char *)mbi->cmdline;
        u32 i = 0;
        while (s[i] && i < sizeof(cmdline) - 1) {
            cmdline[i] = s[i];
            i++;
        }
        cmdline[i] = 0;
    }
    parse_cmdline();

    u64 end = start_addr + size;
    if ((start_addr | size) & (PAGE - 1))
        fatal("start and size must be multiples of 4096", 0, 0);
    if (!size || end > 0xFFFFF000ull)
        fatal("range must be non-empty and below 4 GiB", 0, 0);
    if (start_addr < (u32)_end)
        fatal("range overlaps the guest image (start below _end)", 0, 0);
    if (!range_is_ram(mbi, start_addr, end))
        fatal("range is not inside one usable RAM region (raise -m?)", 0, 0);
    start_pfn = (u32)(start_addr / PAGE);
    npages = (u32)(size / PAGE);

    for (u32 i = 0; i < WORDS; i++)
        table[i] = mix(seed + (u64)i * 0xD1B54A32D192ED03ull);
    for (u32 pfn = start_pfn; pfn < start_pfn + npages; pfn++) {
        if (is_zero(pfn)) {
            nzero++;
            zero_page(pfn);
        } else {
            fill_page(pfn, 0);
            ndirty += (u32)is_dirty(pfn);
        }
    }
    cursor = start_pfn + npages; /* pass 0 (the fill) is complete */
    dirtying = dirty_mode && ndirty;
    ready_line();
    tiny_loop();
}

/* Also the continuation of every hardware interrupt (see tiny_interrupt). */
void tiny_loop(void)
{
    for (;;) {
        int c = getc_nowait();
        if (c >= 0)
            command(c);
        else if (dirtying)
            dirty_step();
        else
            __asm__ volatile("sti; hlt; cli" ::: "memory");
    }
}

/* gcc may emit calls to these even with -ffreestanding. */
void *memset(void *d, int c, u32 n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u32 n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}
