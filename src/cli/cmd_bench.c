/* flashmoe bench: decode and prefill speed of a packed model, where each layer's time goes, and
 * the floors measured in the same run — the disk's bandwidth for expert-sized random reads and the
 * RAM's read bandwidth — so that time per layer can be read against what the hardware allows. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <liburing.h>

#include "backend/cpu/membw.h"
#include "backend/cpu/mixer_kernels.h"
#include "cli/cli.h"
#include "flashmoe.h"
#include "model/forward_cuda.h"
#include "model/model.h"
#include "store/expert_store.h"
#include "util/progress.h"

static void help(void) {
    printf("usage: flashmoe bench -m MODEL [options]\n\n"
           "Measures prefill and decode speed, the time per layer split into dense compute (mixer), routing,\n"
           "shared expert, waiting for expert bytes and routed-expert compute, the bytes read and cache hits,\n"
           "and, in the same run, the floors: the disk's rate for expert-sized random reads (O_DIRECT; the\n"
           "best of one thread, --io-threads threads, io_uring and the expert store's own reads of a\n"
           "decode step, probed before and after decoding: the faster counts) and the RAM's read rate.\n"
           "floor per layer = max(expert bytes the used experts needed from disk / disk rate, bytes\n"
           "touched / RAM rate). Where a layer takes longer than its floor, the disk line (the kernel's\n"
           "counters for the device) says whether the disk sat idle or read slowly, and the machine line\n"
           "how much other processes and the hypervisor took.\n\n"
           "options:\n"
           "  -m, --model DIR       packed model (e.g. from flashmoe synth)\n"
           "  --prompt N            prefill tokens (default 64)\n"
           "  --gen N               decode tokens (default 16; with --backend cuda and every expert in\n"
           "                        VRAM, after 2 untimed ones: the eager first step and the graph capture)\n"
           "  --cold                drop the expert files from the page cache before decoding\n"
           "  --io-bench            measure the read engines alone (pread/direct: 1..16 threads; uring:\n"
           "                        queue depth 1..16; the expert store per engine, a decode step's\n"
           "                        experts a request) against the disk's sequential O_DIRECT rate, then stop\n"
           "  --engines[=LIST]      run the whole measurement once per read engine in this process and\n"
           "                        print one row each (LIST: comma-separated, default pread,direct,uring)\n"
           "  --json                one JSON object on stdout (--engines: an array, one object per engine)\n" FM_CLI_MODEL_HELP
           "\nexample:\n"
           "  flashmoe synth --preset qwen3.5-397b-a17b --layers 8 /data/slice\n"
           "  flashmoe bench -m /data/slice --gen 8 --mem-budget 16G --cold\n"
           "  flashmoe bench -m /data/slice --gen 8 --mem-budget 8G --cold --engines\n");
}

/* Bytes this process has made the storage layer fetch (/proc/self/io read_bytes). */
static uint64_t storage_read_bytes(void) {
    FILE *f = fopen("/proc/self/io", "r");
    if (!f) return 0;
    char line[256];
    uint64_t v = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "read_bytes:", 11)) v = strtoull(line + 11, NULL, 10);
    fclose(f);
    return v;
}

/* CPU time of the whole machine (/proc/stat's "cpu" line: busy and steal apart, and the total) and of
 * this process (/proc/self/stat utime + stime), in clock ticks: other processes' share of the CPUs
 * during a measurement says how contended the machine was (on a shared machine, the figures move). */
typedef struct cpu_sample {
    unsigned long long busy, steal, total, self;
} cpu_sample;

static cpu_sample cpu_sample_now(void) {
    cpu_sample c = {0};
    unsigned long long v[8] = {0}; /* user nice system idle iowait irq softirq steal */
    FILE *f = fopen("/proc/stat", "r");
    if (f) {
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) == 8) {
            c.busy = v[0] + v[1] + v[2] + v[5] + v[6];
            c.steal = v[7];
            c.total = c.busy + v[3] + v[4] + v[7];
        }
        fclose(f);
    }
    char buf[1024];
    f = fopen("/proc/self/stat", "r");
    if (f) {
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = 0;
        fclose(f);
        const char *p = strrchr(buf, ')'); /* the fields after the command name: state is field 3 */
        unsigned long long ut = 0, st = 0;
        if (p && sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) == 2) c.self = ut + st;
    }
    return c;
}

/* Other processes' busy time and the hypervisor's steal time from a to b, as fractions of all CPU time. */
static void cpu_shares(cpu_sample a, cpu_sample b, double *other, double *steal) {
    double total = b.total > a.total ? (double)(b.total - a.total) : 0;
    double busy = (double)(b.busy - a.busy) - (double)(b.self - a.self);
    *other = total > 0 && busy > 0 ? busy / total : 0;
    *steal = total > 0 ? (double)(b.steal - a.steal) / total : 0;
}

/* The block device holding the expert files, from the kernel's counters (/sys/dev/block/M:m/stat):
 * io_ticks = ms with at least one request in flight, time_in_queue = ms summed over requests. Read
 * around the decode, they say how much of its time the disk was busy and how deep its queue was:
 * where a layer's time exceeds the disk floor, this tells idle gaps from slow reads. ok is false
 * where the files sit on no block device (overlay or network file systems). */
typedef struct disk_sample {
    bool ok;
    unsigned long long io_ticks, queue_ms;
} disk_sample;

static disk_sample disk_sample_now(const fm_packed_model *pm) {
    disk_sample d = {0};
    struct stat st;
    if (stat(pm->experts[0].file, &st) != 0 || major(st.st_dev) == 0) return d;
    char path[64];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/stat", major(st.st_dev), minor(st.st_dev));
    FILE *f = fopen(path, "r");
    if (!f) return d;
    unsigned long long v[11];
    if (fscanf(f, "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
               &v[6], &v[7], &v[8], &v[9], &v[10]) == 11) {
        d.ok = true;
        d.io_ticks = v[9];
        d.queue_ms = v[10];
    }
    fclose(f);
    return d;
}

/* Peak resident set of this process (/proc/self/status VmHWM), bytes; 0 if unknown. */
static uint64_t peak_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    uint64_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = strtoull(line + 6, NULL, 10);
    fclose(f);
    return kb * 1024;
}

static void drop_expert_pages(const fm_packed_model *pm) {
    for (int l = 0; l < pm->config.n_layers; l++) {
        int fd = open(pm->experts[l].file, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

/* Resets this process's peak RSS (VmHWM), so each engine's run reports its own. */
static void reset_peak_rss(void) {
    int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    if (write(fd, "5", 1) < 0) { /* older kernels: the peak stays the process's */
    }
    close(fd);
}

/* ---- disk floor: expert-sized random reads ---- */

/* The i-th random expert read of a probe: layer and expert. */
static void probe_pick(const fm_packed_model *pm, uint64_t seed, int i, int *layer, uint64_t *expert) {
    uint64_t h = (seed + (uint64_t)i) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    *layer = (int)(h % (uint64_t)pm->config.n_layers);
    *expert = (h >> 17) % (uint64_t)pm->config.n_experts;
}

typedef struct disk_job {
    const fm_packed_model *pm;
    int direct;
    int n_reads;
    int next; /* shared cursor */
    uint64_t seed;
    pthread_mutex_t mu;
    uint64_t bytes;
    int failed;
} disk_job;

static void *disk_reader(void *arg) {
    disk_job *j = arg;
    const fm_packed_model *pm = j->pm;
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, pm->max_expert_stride) != 0) return NULL;
    int *fds = calloc((size_t)pm->config.n_layers, sizeof(int));
    for (int l = 0; fds && l < pm->config.n_layers; l++)
        fds[l] = open(pm->experts[l].file, O_RDONLY | O_CLOEXEC | (j->direct ? O_DIRECT : 0));
    for (;;) {
        pthread_mutex_lock(&j->mu);
        int i = j->next++;
        pthread_mutex_unlock(&j->mu);
        if (i >= j->n_reads || !fds) break;
        int l;
        uint64_t e;
        probe_pick(pm, j->seed, i, &l, &e);
        uint64_t stride = pm->experts[l].stride;
        ssize_t r = fds[l] >= 0 ? pread(fds[l], buf, stride, (off_t)(e * stride)) : -1;
        pthread_mutex_lock(&j->mu);
        if (r == (ssize_t)stride) j->bytes += stride;
        else j->failed++;
        pthread_mutex_unlock(&j->mu);
    }
    for (int l = 0; fds && l < pm->config.n_layers; l++)
        if (fds[l] >= 0) close(fds[l]);
    free(fds);
    free(buf);
    return NULL;
}

/* GB/s of n_reads random expert reads on `threads` threads; page cache dropped first unless direct. */

static double disk_rate(const fm_packed_model *pm, int threads, int direct, int n_reads, uint64_t seed) {
    if (!direct) drop_expert_pages(pm);
    disk_job j = {.pm = pm, .direct = direct, .n_reads = n_reads, .seed = seed};
    pthread_mutex_init(&j.mu, NULL);
    pthread_t th[64];
    if (threads > 64) threads = 64;
    double t0 = fm_time_now();
    int started = 0;
    for (int i = 0; i < threads; i++)
        if (pthread_create(&th[i], NULL, disk_reader, &j) == 0) started++;
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    double dt = fm_time_now() - t0;
    pthread_mutex_destroy(&j.mu);
    if (j.failed || !j.bytes) return 0;
    return (double)j.bytes / dt / 1e9;
}

/* GB/s of the same random expert reads through one io_uring with `depth` experts in flight, each
 * read whole (piece 0) or in pieces of `piece` bytes; O_DIRECT unless !direct (page cache dropped
 * first). 0 if a read fails; -1 (reason in why) if io_uring is refused here. */
static double uring_rate(const fm_packed_model *pm, int depth, int direct, uint64_t piece, int n_reads, uint64_t seed,
                         char *why, size_t whycap) {
    if (!direct) drop_expert_pages(pm);
    uint64_t max_stride = pm->max_expert_stride;
    if (!piece || piece > max_stride) piece = max_stride;
    unsigned ppe = (unsigned)((max_stride + piece - 1) / piece), entries = 8;
    while (entries < (unsigned)depth * ppe && entries < 4096) entries *= 2;
    struct io_uring ring;
    int r = io_uring_queue_init(entries, &ring, 0);
    if (r < 0) {
        snprintf(why, whycap, "io_uring_queue_init: %s", strerror(-r));
        return -1;
    }
    int nl = pm->config.n_layers;
    int *fds = calloc((size_t)nl, sizeof(int)), *left = calloc((size_t)depth, sizeof(int)), *free_slots = calloc((size_t)depth, sizeof(int));
    uint8_t *buf = NULL;
    double rate = 0;
    int n_free = depth, issued = 0, in_flight = 0, failed = 0;
    uint64_t bytes = 0;
    for (int l = 0; fds && l < nl; l++) fds[l] = -1;
    if (!fds || !left || !free_slots || posix_memalign((void **)&buf, 4096, (size_t)depth * max_stride) != 0) goto out;
    for (int l = 0; l < nl; l++) fds[l] = open(pm->experts[l].file, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    for (int l = 0; l < nl; l++)
        if (fds[l] < 0) goto out;
    for (int i = 0; i < depth; i++) free_slots[i] = i;
    double t0 = fm_time_now();
    while ((issued < n_reads || in_flight > 0) && !failed) {
        while (issued < n_reads && n_free > 0) {
            int sl = free_slots[--n_free], l;
            uint64_t e;
            probe_pick(pm, seed, issued++, &l, &e);
            uint64_t stride = pm->experts[l].stride;
            left[sl] = 0;
            for (uint64_t at = 0; at < stride; at += piece) {
                uint64_t len = stride - at < piece ? stride - at : piece;
                struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
                if (!sqe) {
                    io_uring_submit(&ring);
                    sqe = io_uring_get_sqe(&ring);
                }
                if (!sqe) {
                    failed = 1;
                    break;
                }
                io_uring_prep_read(sqe, fds[l], buf + (size_t)sl * max_stride + at, (unsigned)len, e * stride + at);
                io_uring_sqe_set_data64(sqe, (uint64_t)sl << 32 | len);
                left[sl]++;
                in_flight++;
            }
        }
        struct io_uring_cqe *cqe;
        r = io_uring_submit_and_wait(&ring, 1);
        if (r < 0 && r != -EINTR) failed = 1;
        while (in_flight > 0 && io_uring_peek_cqe(&ring, &cqe) == 0) {
            uint64_t d = io_uring_cqe_get_data64(cqe);
            int sl = (int)(d >> 32);
            if (cqe->res != (int)(uint32_t)d) failed = 1; /* whole pieces only: a short read is a failure here */
            else bytes += (uint64_t)cqe->res;
            io_uring_cqe_seen(&ring, cqe);
            in_flight--;
            if (--left[sl] == 0) free_slots[n_free++] = sl;
        }
    }
    while (in_flight > 0) { /* after a failure: nothing may land in freed buffers */
        struct io_uring_cqe *cqe;
        if (io_uring_wait_cqe(&ring, &cqe) < 0) break;
        io_uring_cqe_seen(&ring, cqe);
        in_flight--;
    }
    double dt = fm_time_now() - t0;
    if (!failed && bytes) rate = (double)bytes / dt / 1e9;
out:
    io_uring_queue_exit(&ring);
    for (int l = 0; fds && l < nl; l++)
        if (fds[l] >= 0) close(fds[l]);
    free(fds);
    free(left);
    free(free_slots);
    free(buf);
    return rate;
}

static uint64_t gcd64(uint64_t a, uint64_t b) {
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* GB/s of the expert store itself, read as decode reads it but with no compute: requests of k
 * distinct random experts of one layer, each waited for in request order, no RAM cache (page cache
 * dropped first for pread); n_reads experts in all. Against the raw rates (disk_rate, uring_rate) it
 * shows what the store's own pipeline (window, buffers, reaping) costs or gains. -1 (why filled) if
 * the store does not open or falls back to another engine. */
static double store_rate(const fm_packed_model *pm, fm_io_engine engine, int k, int n_reads, uint64_t seed, char *why,
                         size_t cap) {
    const int E = pm->config.n_experts;
    if (k > E) k = E;
    fm_store_options o = {.engine = engine, .io_threads = 4};
    fm_expert_store *s = NULL;
    if (fm_store_open(pm, k, &o, &s) != FM_OK) {
        snprintf(why, cap, "%s", fm_last_error());
        return -1;
    }
    if (fm_store_engine(s) != engine) {
        snprintf(why, cap, "%s refused here", fm_io_engine_name(engine));
        fm_store_free(s);
        return -1;
    }
    if (engine == FM_IO_PREAD) drop_expert_pages(pm);
    int32_t ids[64];
    uint64_t bytes = 0, step = 37; /* e + j * step mod E are distinct for j < E when step is prime to E */
    while (gcd64(step, (uint64_t)E) != 1) step += 2;
    double t0 = fm_time_now();
    for (int i = 0; i < n_reads; i += k) {
        int l;
        uint64_t e;
        probe_pick(pm, seed, i, &l, &e);
        for (int j = 0; j < k && j < 64; j++) ids[j] = (int32_t)((e + (uint64_t)j * step) % (uint64_t)E);
        int n = k < 64 ? k : 64;
        if (fm_store_request(s, l, ids, n) != FM_OK) break;
        for (int j = 0; j < n; j++) {
            const uint8_t *blk;
            if (fm_store_wait(s, j, &blk) != FM_OK) {
                snprintf(why, cap, "%s", fm_last_error());
                fm_store_free(s);
                return -1;
            }
            bytes += pm->experts[l].stride;
        }
    }
    double dt = fm_time_now() - t0;
    fm_store_free(s);
    return bytes && dt > 0 ? (double)bytes / dt / 1e9 : -1;
}

/* The disk's rate for random expert reads, the best of four ways to read them (the rate depends on
 * the queue depth and request size, differently per disk): one thread, `threads` threads (whole
 * experts, O_DIRECT: buffered where O_DIRECT is refused), io_uring with 1 MiB pieces, 2 experts in
 * flight, and the expert store's own io_uring engine reading a decode step's top-k experts of one
 * layer at a time (store_rate). n_reads / 2 experts each. */
static double probe_disk(const fm_packed_model *pm, int threads, int n_reads, uint64_t seed) {
    int n = n_reads / 2 > 8 ? n_reads / 2 : 8, direct = 1;
    double best = disk_rate(pm, 1, 1, n, seed);
    if (best <= 0) best = disk_rate(pm, 1, direct = 0, n, seed);
    double r = disk_rate(pm, threads, direct, n, seed + 1);
    best = r > best ? r : best;
    char why[160];
    r = uring_rate(pm, 2, direct, (uint64_t)1 << 20, n, seed + 2, why, sizeof why); /* -1: no io_uring here */
    best = r > best ? r : best;
    r = store_rate(pm, FM_IO_URING, pm->config.n_experts_used, n, seed + 3, why, sizeof why); /* -1: refused */
    return r > best ? r : best;
}

/* The disk's sequential rate as `dd iflag=direct bs=8M` measures it: 8 MiB O_DIRECT reads through
 * the layer files one after another, `total` bytes at most, one thread. 0 if refused. */
static double sequential_rate(const fm_packed_model *pm, uint64_t total) {
    const size_t bs = 8u << 20;
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, bs) != 0) return 0;
    uint64_t bytes = 0;
    double t0 = fm_time_now();
    for (int l = 0; l < pm->config.n_layers && bytes < total; l++) {
        int fd = open(pm->experts[l].file, O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (fd < 0) break;
        for (off_t off = 0; bytes < total; off += (off_t)bs) {
            ssize_t r = pread(fd, buf, bs, off);
            if (r <= 0) break;
            bytes += (uint64_t)r;
        }
        close(fd);
    }
    double dt = fm_time_now() - t0;
    free(buf);
    return bytes ? (double)bytes / dt / 1e9 : 0;
}

/* --io-bench: each engine x threads (or queue depth) against the sequential rate. */
static void io_bench(const fm_packed_model *pm, int n_probe, bool json) {
    double seq = sequential_rate(pm, 2ull << 30);
    static const struct {
        const char *name;
        int kind; /* 0 pread threads, 1 uring */
        int direct;
        uint64_t piece;
        const char *what;
    } rows[] = {{"pread", 0, 0, 0, "threads, page cache"},
                {"direct", 0, 1, 0, "threads, O_DIRECT"},
                {"uring", 1, 1, 0, "queue depth, O_DIRECT, one read per expert"},
                {"uring-1M", 1, 1, 1 << 20, "queue depth (experts), O_DIRECT, 1 MiB pieces"},
                {"uring-buf", 1, 0, 0, "queue depth, page cache, one read per expert"}};
    if (json) printf("[{\"engine\": \"sequential\", \"depth\": 1, \"gbs\": %.3f, \"ratio\": 1.0}", seq);
    else {
        printf("sequential O_DIRECT 8 MiB reads (dd iflag=direct): %.2f GB/s\n", seq);
        printf("%-10s %6s %8s %8s  %s\n", "engine", "depth", "GB/s", "/ seq", "(depth: threads or experts in flight)");
    }
    for (size_t k = 0; k < sizeof rows / sizeof *rows; k++)
        for (int d = 1; d <= 16; d *= 2) {
            char why[128] = "";
            unsigned seed = 1000u + (unsigned)d * 7 + (unsigned)rows[k].direct;
            double r = rows[k].kind == 0 ? disk_rate(pm, d, rows[k].direct, n_probe, seed)
                                         : uring_rate(pm, d, rows[k].direct, rows[k].piece, n_probe, seed, why, sizeof why);
            if (json) {
                printf(",\n {\"engine\": \"%s\", \"depth\": %d, \"gbs\": %.3f, \"ratio\": %.4f}", rows[k].name, d,
                       r < 0 ? 0 : r, seq > 0 && r > 0 ? r / seq : 0);
            } else if (r < 0) {
                printf("%-10s %6d %8s %8s  %s\n", rows[k].name, d, "-", "-", why);
            } else {
                printf("%-10s %6d %8.2f %8.2f  %s\n", rows[k].name, d, r, seq > 0 ? r / seq : 0, d == 1 ? rows[k].what : "");
            }
            fflush(stdout);
        }
    static const fm_io_engine store_engines[] = {FM_IO_PREAD, FM_IO_DIRECT, FM_IO_URING};
    for (size_t k = 0; k < sizeof store_engines / sizeof *store_engines; k++) {
        char why[200] = "", name[32];
        const int per = pm->config.n_experts_used > 0 ? pm->config.n_experts_used : 10; /* a decode step's experts */
        double r = store_rate(pm, store_engines[k], per, n_probe, 3000u + (unsigned)k, why, sizeof why);
        snprintf(name, sizeof name, "store-%s", fm_io_engine_name(store_engines[k]));
        if (json)
            printf(",\n {\"engine\": \"%s\", \"depth\": %d, \"gbs\": %.3f, \"ratio\": %.4f}", name, per, r < 0 ? 0 : r,
                   seq > 0 && r > 0 ? r / seq : 0);
        else if (r < 0)
            printf("%-12s %4d %8s %8s  %s\n", name, per, "-", "-", why);
        else
            printf("%-12s %4d %8.2f %8.2f  %s\n", name, per, r, seq > 0 ? r / seq : 0,
                   k == 0 ? "the expert store as decode drives it (depth: experts a request), no compute" : "");
        fflush(stdout);
    }
    if (json) printf("]\n");
}

/* ---- the benchmark ---- */

enum { OPT_PROMPT = 256, OPT_GEN, OPT_COLD, OPT_IO_ONLY, OPT_JSON, OPT_ENGINES };

/* Greedy decoding's next token (0 for a row with a NaN: bench measures speed, not text). */
static int32_t argmax(const float *x, int64_t n) {
    float m;
    int64_t b = fm_cpu_argmax(x, n, &m);
    return b < 0 ? 0 : (int32_t)b;
}

/* One greedy decode step: *next in, the token after it out (0 for a NaN logit, as argmax). The
 * argmax runs where the logits are (on the GPU with --backend cuda and resident experts). */
static fm_status decode_one(fm_session *s, int32_t *next) {
    int32_t got;
    fm_status st = fm_session_eval_greedy(s, next, 1, &got);
    if (st == FM_OK) *next = got < 0 ? 0 : got;
    return st;
}

/* What one measurement (prefill, then decode) of one opened model found. */
typedef struct bench_run {
    fm_io_engine asked, engine; /* the engine asked for, the one the store reads with */
    bool direct;
    uint64_t store_mem, rss;
    double cpu_other, cpu_steal;               /* decode: other processes' and the hypervisor's share of the CPUs */
    double disk_busy, disk_queue;              /* decode: share of its time the disk had a request in flight, and
                                                  the mean requests in flight while busy (-1: not known) */
    double prefill_s, decode_s, head_s;
    uint64_t prefill_reads, prefill_max_layer_reads;
    double pf[5];                              /* prefill seconds: mixer, route, shared, wait, experts */
    double mixer, route, shared, wait, compute; /* decode seconds summed over tokens and layers */
    uint64_t store_bytes, requested, hits, mapped, guessed, guessed_right, disk_bytes, spec_reads, spec_hits;
    uint64_t spec_wasted_bytes;                /* speculative reads that reached RAM and were never used */
    fm_cuda_stats vram;                        /* --backend cuda: the VRAM expert cache during decode */
    fm_cuda_stats pf_vram;                     /* --backend cuda: the same during prefill */
    double copy_gbs;                           /* --backend cuda: device copy bandwidth (0: not measured) */
    double h2d_gbs;                            /* --backend cuda: pinned host-to-device bandwidth (0: not measured) */
    double floor_h2d_ms, floor_gpu_ms;         /* --backend cuda: the copy and GPU-compute parts of the floor */
    /* from the floors */
    double layer_ms, floor_ms, floor_disk_ms, floor_ram_ms;
} bench_run;

typedef struct bench_setup {
    const char *model;
    int64_t n_prompt, n_gen;
    bool cold;
    int io_threads;
    double disk_gbs, ram_gbs;
    double disk_before, disk_after; /* the disk probes around the measurement; disk_gbs is the faster */
    uint64_t touched_token; /* bytes a decode token touches: dense layer weights + top-k experts */
} bench_setup;

/* The second probe, after the measurement: the floor uses the faster of the two (the disk's rate
 * drifts on shared machines; the faster one gives the lower floor, so the ratio errs high). */
static void probe_disk_after(const fm_packed_model *pm, int n_reads, bench_setup *b) {
    b->disk_after = probe_disk(pm, b->io_threads, n_reads, 54321);
    b->disk_gbs = b->disk_before > b->disk_after ? b->disk_before : b->disk_after;
}

/* One-token steps decoded before the timed ones where the model is resident on the GPU: the first
 * runs eagerly and the second captures the CUDA graph that the others replay (one-time setup). */
#define GPU_WARMUP_TOKENS 2

/* Prefill n_prompt tokens, then decode n_gen greedily (after GPU_WARMUP_TOKENS untimed ones with
 * --backend cuda and a resident model), on the opened model; fills r. */
static int measure(fm_model *m, const bench_setup *b, bench_run *r) {
    const fm_config *cf = &m->cfg;
    const fm_packed_model *pm = m->packed;
    int64_t V = cf->n_vocab;
    int rc = FM_EXIT_OK;
    fm_session *s = NULL;
    float *logits = malloc(sizeof(float) * (size_t)V);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)b->n_prompt);
    if (!logits || !ids || fm_session_init(m, b->n_prompt + GPU_WARMUP_TOKENS + b->n_gen, &s) != FM_OK) {
        rc = logits && ids ? fm_cli_fail("bench") : FM_EXIT_FAIL;
        goto done;
    }
    r->engine = fm_store_engine(m->store);
    r->direct = fm_store_direct(m->store);
    r->store_mem = fm_store_memory_bytes(m->store);
    for (int64_t i = 0; i < b->n_prompt; i++) ids[i] = (int32_t)((i * 2654435761u + 17) % (uint64_t)V);

    /* prefill */
    fm_store_reset_stats(m->store);
    fm_forward_cuda_reset_stats(m);
    double t0 = fm_time_now();
    if (fm_session_eval(s, ids, b->n_prompt, logits, false) != FM_OK) {
        rc = fm_cli_fail("bench");
        goto done;
    }
    r->prefill_s = fm_time_now() - t0;
    r->pf_vram = fm_forward_cuda_stats(m);
    for (int l = 0; l < cf->n_layers; l++) {
        uint64_t n = fm_store_layer_stats_get(m->store, l).requested;
        r->prefill_reads += n;
        if (n > r->prefill_max_layer_reads) r->prefill_max_layer_reads = n;
        const fm_layer_timing *lt = fm_session_layer_timing(s, l); /* where the prefill's time went */
        r->pf[0] += lt->mixer, r->pf[1] += lt->route, r->pf[2] += lt->shared, r->pf[3] += lt->expert_wait,
            r->pf[4] += lt->expert_compute;
    }

    /* decode */
    int32_t next = argmax(logits, V);
    for (int i = 0; m->gpu && fm_forward_cuda_stats(m).graphs && i < GPU_WARMUP_TOKENS; i++) {
        if (decode_one(s, &next) != FM_OK) {
            rc = fm_cli_fail("bench");
            goto done;
        }
    }
    if (b->cold) drop_expert_pages(pm);
    fm_store_reset_stats(m->store);
    fm_forward_cuda_reset_stats(m);
    fm_session_reset_timing(s);
    uint64_t disk0 = storage_read_bytes();
    cpu_sample cpu0 = cpu_sample_now();
    disk_sample dk0 = disk_sample_now(pm);
    t0 = fm_time_now();
    for (int64_t i = 0; i < b->n_gen; i++) {
        if (decode_one(s, &next) != FM_OK) {
            rc = fm_cli_fail("bench");
            goto done;
        }
    }
    r->decode_s = fm_time_now() - t0;
    cpu_shares(cpu0, cpu_sample_now(), &r->cpu_other, &r->cpu_steal);
    disk_sample dk1 = disk_sample_now(pm);
    r->disk_busy = r->disk_queue = -1;
    if (dk0.ok && dk1.ok && r->decode_s > 0) {
        double busy_ms = (double)(dk1.io_ticks - dk0.io_ticks);
        r->disk_busy = busy_ms / (r->decode_s * 1e3);
        r->disk_queue = busy_ms > 0 ? (double)(dk1.queue_ms - dk0.queue_ms) / busy_ms : 0;
    }
    r->vram = fm_forward_cuda_stats(m);
    if (m->gpu && fm_forward_cuda_copy_gbs(m, &r->copy_gbs) != FM_OK) /* for the roofline; 0 if it does not fit */
        fprintf(stderr, "bench: no device copy bandwidth (%s)\n", fm_last_error());
    if (m->gpu && fm_forward_cuda_h2d_gbs(m, &r->h2d_gbs) != FM_OK) /* for the floor; 0 if it does not fit */
        fprintf(stderr, "bench: no host-to-device bandwidth (%s)\n", fm_last_error());
    r->disk_bytes = storage_read_bytes() - disk0;
    r->rss = peak_rss(); /* before the RAM probe's 1 GiB buffer */
    r->head_s = fm_session_head_seconds(s);
    for (int l = 0; l < cf->n_layers; l++) {
        const fm_layer_timing *lt = fm_session_layer_timing(s, l);
        r->mixer += lt->mixer;
        r->route += lt->route;
        r->shared += lt->shared;
        r->wait += lt->expert_wait;
        r->compute += lt->expert_compute;
        r->guessed += lt->guessed;
        r->guessed_right += lt->guessed_right;
        fm_store_layer_stats st = fm_store_layer_stats_get(m->store, l);
        r->store_bytes += st.bytes_read;
        r->requested += st.requested;
        r->hits += st.hits;
        r->mapped += st.mapped;
        r->spec_reads += st.spec_reads;
        r->spec_hits += st.spec_hits;
        if (st.spec_done > st.spec_hits) r->spec_wasted_bytes += (st.spec_done - st.spec_hits) * pm->experts[l].stride;
    }
done:
    fm_session_free(s);
    free(logits);
    free(ids);
    return rc;
}

/* ms per layer and token, and the floor: max(disk bytes / disk rate, bytes touched / RAM rate). The
 * disk bytes are those the experts that were used needed: what this process read, less speculative
 * reads that were never used (they cost time, so they must not lower the ratio by raising the floor). */
static void apply_floors(const bench_setup *b, int n_layers, bench_run *r) {
    double per = 1e3 / (double)b->n_gen / n_layers; /* seconds summed over tokens and layers -> ms per layer */
    r->layer_ms = (r->mixer + r->route + r->shared + r->wait + r->compute) * per;
    double needed = r->disk_bytes > r->spec_wasted_bytes ? (double)(r->disk_bytes - r->spec_wasted_bytes) : 0.0;
    double touched_layer = (double)b->touched_token / n_layers, missed_layer = needed / (double)b->n_gen / n_layers;
    r->floor_ram_ms = touched_layer / (b->ram_gbs * 1e9) * 1e3;
    r->floor_disk_ms = missed_layer / (b->disk_gbs * 1e9) * 1e3;
    r->floor_ms = r->floor_ram_ms > r->floor_disk_ms ? r->floor_ram_ms : r->floor_disk_ms;
    if (r->copy_gbs > 0 || r->h2d_gbs > 0) { /* --backend cuda: the floor of streaming experts to the GPU */
        /* the time per layer is the whole decode's wall time (lm_head and embedding included): the
         * host's per-layer counters do not see the GPU's time, which overlaps them */
        r->layer_ms = r->decode_s * per;
        double h2d_layer = (double)r->vram.h2d_bytes / (double)b->n_gen / n_layers;
        r->floor_h2d_ms = r->h2d_gbs > 0 ? h2d_layer / (r->h2d_gbs * 1e9) * 1e3 : 0;
        r->floor_gpu_ms = r->copy_gbs > 0 ? (double)r->vram.token_bytes / n_layers / (r->copy_gbs * 1e9) * 1e3 : 0;
        r->floor_ms = r->floor_disk_ms;
        if (r->floor_h2d_ms > r->floor_ms) r->floor_ms = r->floor_h2d_ms;
        if (r->floor_gpu_ms > r->floor_ms) r->floor_ms = r->floor_gpu_ms;
    }
}

static void print_json(const bench_setup *b, const fm_model *m, const fm_model_params *p, const bench_run *r) {
    const fm_config *cf = &m->cfg;
    double per = 1e3 / (double)b->n_gen / cf->n_layers;
    printf("{\"model\": ");
    fm_cli_json_string(stdout, b->model);
    printf(", \"layers\": %d, \"io\": \"%s\", \"threads\": %d, \"prompt\": %lld, \"gen\": %lld, "
           "\"decode_tok_s\": %.4f, \"prefill_tok_s\": %.4f, \"layer_ms\": %.4f, \"floor_ms\": %.4f, "
           "\"floor_ratio\": %.4f, \"floor_disk_ms\": %.4f, \"floor_ram_ms\": %.4f, \"disk_gbs\": %.3f, \"disk_gbs_before\": %.3f, \"disk_gbs_after\": %.3f, "
           "\"ram_gbs\": %.3f, \"bytes_read\": %llu, \"disk_bytes\": %llu, \"hit_rate\": %.4f, \"mapped_rate\": %.4f, "
           "\"mixer_ms\": %.4f, \"route_ms\": %.4f, \"shared_ms\": %.4f, \"wait_ms\": %.4f, \"expert_ms\": %.4f, "
           "\"head_ms\": %.4f, \"prefill_expert_reads\": %llu, \"prefill_max_layer_reads\": %llu, \"peak_rss\": %llu, "
           "\"mem_budget\": %llu, \"prefetch_accuracy\": %.4f, \"prefill_mixer_s\": %.4f, \"prefill_route_s\": %.4f, "
           "\"prefill_shared_s\": %.4f, \"prefill_wait_s\": %.4f, \"prefill_expert_s\": %.4f, \"io_asked\": \"%s\", "
           "\"io_direct\": %s, \"spec_reads\": %llu, \"spec_hits\": %llu, \"spec_wasted_bytes\": %llu, \"cpu_other\": %.4f, \"cpu_steal\": %.4f, "
           "\"disk_busy\": %.4f, \"disk_queue\": %.3f",
           cf->n_layers, fm_io_engine_name(r->engine), fm_pool_size(m->pool), (long long)b->n_prompt,
           (long long)b->n_gen, (double)b->n_gen / r->decode_s, (double)b->n_prompt / r->prefill_s, r->layer_ms, r->floor_ms,
           r->layer_ms / r->floor_ms, r->floor_disk_ms, r->floor_ram_ms, b->disk_gbs, b->disk_before, b->disk_after, b->ram_gbs,
           (unsigned long long)r->store_bytes, (unsigned long long)r->disk_bytes,
           r->requested ? (double)r->hits / (double)r->requested : 0.0,
           r->requested ? (double)r->mapped / (double)r->requested : 0.0, r->mixer * per, r->route * per, r->shared * per,
           r->wait * per, r->compute * per, r->head_s * 1e3 / (double)b->n_gen, (unsigned long long)r->prefill_reads,
           (unsigned long long)r->prefill_max_layer_reads, (unsigned long long)r->rss, (unsigned long long)p->mem_budget,
           r->guessed ? (double)r->guessed_right / (double)r->guessed : 0.0, r->pf[0], r->pf[1], r->pf[2], r->pf[3], r->pf[4],
           fm_io_engine_name(r->asked), r->direct ? "true" : "false",
           (unsigned long long)r->spec_reads, (unsigned long long)r->spec_hits, (unsigned long long)r->spec_wasted_bytes,
           r->cpu_other, r->cpu_steal, r->disk_busy, r->disk_queue);
    if (m->gpu) { /* --backend cuda; roofline = copy bandwidth / device bytes a token reads */
        double roof = r->vram.token_bytes ? r->copy_gbs * 1e9 / (double)r->vram.token_bytes : 0;
        printf(", \"vram_hit_rate\": %.4f, \"h2d_bytes\": %llu, \"resident\": %s, \"graph_steps\": %llu, "
               "\"gpu_token_bytes\": %llu, \"gpu_copy_gbs\": %.1f, \"roofline_tok_s\": %.1f, \"roofline_ratio\": %.4f",
               r->vram.requested ? (double)r->vram.hits / (double)r->vram.requested : 0.0,
               (unsigned long long)r->vram.h2d_bytes, r->vram.resident ? "true" : "false",
               (unsigned long long)r->vram.graph_steps, (unsigned long long)r->vram.token_bytes, r->copy_gbs, roof,
               roof > 0 ? (double)b->n_gen / r->decode_s / roof : 0.0);
        int64_t chunks = (b->n_prompt + 511) / 512; /* fm_session_eval's chunks of at most 512 tokens */
        printf(", \"floor_h2d_ms\": %.4f, \"floor_gpu_ms\": %.4f, \"h2d_gbs\": %.3f, \"vram_policy\": \"%s\", "
               "\"vram_slots\": %d, \"slot_bytes\": %llu, \"gpu_dense_bytes\": %llu, \"gpu_state_bytes\": %llu, "
               "\"vram_budget\": %llu, \"vram_misses\": %llu, \"vram_evictions\": %llu, \"overlap\": %s, "
               "\"pinned_bytes\": %llu, \"copy_busy_ms\": %.4f, \"prefill_chunks\": %lld, \"prefill_vram_requested\": %llu, "
               "\"prefill_vram_misses\": %llu, \"prefill_h2d_bytes\": %llu, \"prefill_copy_busy_s\": %.4f",
               r->floor_h2d_ms, r->floor_gpu_ms, r->h2d_gbs, p->vram_policy == FM_VRAM_FLRU ? "flru" : "lru", r->vram.slots,
               (unsigned long long)r->vram.slot_bytes, (unsigned long long)r->vram.dense_bytes,
               (unsigned long long)r->pf_vram.state_bytes, (unsigned long long)r->vram.budget,
               (unsigned long long)r->vram.misses, (unsigned long long)r->vram.evictions, r->vram.overlap ? "true" : "false",
               (unsigned long long)r->vram.pinned_bytes, r->vram.copy_seconds * per, (long long)chunks,
               (unsigned long long)r->pf_vram.requested, (unsigned long long)r->pf_vram.misses,
               (unsigned long long)r->pf_vram.h2d_bytes, r->pf_vram.copy_seconds);
    }
    printf("}");
}

/* "uring, O_DIRECT, a layer's reads at once" / "pread, 4 reader threads" */
static const char *engine_line(const bench_setup *b, const bench_run *r, char *buf, size_t cap) {
    const char *name = fm_io_engine_name(r->engine);
    if (r->engine == FM_IO_URING)
        snprintf(buf, cap, "uring (%s), no reader threads", r->direct ? "O_DIRECT" : "buffered: O_DIRECT refused");
    else if (r->engine == FM_IO_MMAP)
        snprintf(buf, cap, "mmap");
    else
        snprintf(buf, cap, "%s, %d reader threads", name, b->io_threads);
    if (r->engine != r->asked) {
        size_t n = strlen(buf);
        snprintf(buf + n, cap - n, " (asked for %s: refused here)", fm_io_engine_name(r->asked));
    }
    return buf;
}

static void print_text(const bench_setup *b, const fm_model *m, const fm_model_params *p, const bench_run *r) {
    const fm_config *cf = &m->cfg;
    double per = 1e3 / (double)b->n_gen / cf->n_layers;
    const double *pf = r->pf;
    char b1[32], b2[32], b3[32], line[160];
    printf("model        %s (%d layers, %d experts per token)\n", b->model, cf->n_layers, m->n_experts_used);
    printf("io           %s, expert buffers+cache %s; %d compute threads\n", engine_line(b, r, line, sizeof line),
           fm_human_bytes((double)r->store_mem, b1, sizeof b1), fm_pool_size(m->pool));
    printf("floors       disk %.2f GB/s (random expert reads, O_DIRECT, best way; %.2f before decoding, %.2f after), RAM %.2f GB/s\n",
           b->disk_gbs, b->disk_before, b->disk_after, b->ram_gbs);
    printf("prefill      %lld tokens in %.2f s: %.2f tok/s; %llu expert reads over %d layers (at most %llu in one layer)\n",
           (long long)b->n_prompt, r->prefill_s, (double)b->n_prompt / r->prefill_s, (unsigned long long)r->prefill_reads,
           cf->n_layers, (unsigned long long)r->prefill_max_layer_reads);
    printf("prefill time %.2f s = mixer %.2f + route %.2f + shared %.2f + expert wait %.2f + expert compute %.2f"
           " (+ %.2f embedding and lm_head)\n", pf[0] + pf[1] + pf[2] + pf[3] + pf[4], pf[0], pf[1], pf[2], pf[3], pf[4],
           r->prefill_s - (pf[0] + pf[1] + pf[2] + pf[3] + pf[4]));
    printf("decode       %lld tokens in %.2f s: %.3f tok/s%s\n", (long long)b->n_gen, r->decode_s,
           (double)b->n_gen / r->decode_s, b->cold ? " (expert pages dropped first)" : "");
    if (m->gpu) /* layer_ms is the decode's wall time per layer there (lm_head included); the parts are host time */
        printf("per layer    %.2f ms (decode wall time); host: mixer %.2f + route %.2f + shared %.2f + expert wait %.2f"
               " + expert enqueue/copies %.2f\n",
               r->layer_ms, r->mixer * per, r->route * per, r->shared * per, r->wait * per, r->compute * per);
    else
        printf("per layer    %.2f ms = mixer %.2f + route %.2f + shared %.2f + expert wait %.2f + expert compute %.2f\n",
               r->layer_ms, r->mixer * per, r->route * per, r->shared * per, r->wait * per, r->compute * per);
    printf("lm_head      %.2f ms per token\n", r->head_s * 1e3 / (double)b->n_gen);
    printf("bytes        %s from expert files (%s from the disk), hit rate %.1f%%, %.1f%% used in place from the page"
           " cache, %s touched per token\n",
           fm_human_bytes((double)r->store_bytes, b1, sizeof b1), fm_human_bytes((double)r->disk_bytes, b2, sizeof b2),
           r->requested ? 100.0 * (double)r->hits / (double)r->requested : 0.0,
           r->requested ? 100.0 * (double)r->mapped / (double)r->requested : 0.0,
           fm_human_bytes((double)b->touched_token, b3, sizeof b3));
    if (m->gpu)
        printf("floor        %.2f ms per layer = max(disk %.2f, host->GPU copies %.2f at %.1f GB/s pinned, GPU %.3f at %.0f GB/s):"
               " decode wall time per layer %.2f ms, / floor = %.2f\n",
               r->floor_ms, r->floor_disk_ms, r->floor_h2d_ms, r->h2d_gbs, r->floor_gpu_ms, r->copy_gbs, r->layer_ms,
               r->layer_ms / r->floor_ms);
    else
        printf("floor        %.2f ms per layer (disk %.2f, RAM %.2f): time / floor = %.2f\n", r->floor_ms, r->floor_disk_ms,
               r->floor_ram_ms, r->layer_ms / r->floor_ms);
    if (m->gpu) {
        printf("vram         %s: expert cache of %d slots%s, decode hit rate %.1f%%, %s copied to the GPU\n",
               fm_forward_cuda_device(m), r->vram.slots, r->vram.resident ? " (all experts resident)" : "",
               r->vram.requested ? 100.0 * (double)r->vram.hits / (double)r->vram.requested : 0.0,
               fm_human_bytes((double)r->vram.h2d_bytes, b1, sizeof b1));
        printf("copies       %s: %llu copies on the copy stream, busy %.2f ms per layer; store buffers %s; prefill %s"
               " copied for %llu experts needed (per chunk and layer, summed), %llu misses\n",
               r->vram.overlap ? "overlapped" : "synchronous (FLASHMOE_CUDA_OVERLAP=0)", (unsigned long long)r->vram.copies,
               r->vram.copy_seconds * per,
               r->vram.pinned_bytes ? fm_human_bytes((double)r->vram.pinned_bytes, b2, sizeof b2) : "pageable",
               fm_human_bytes((double)r->pf_vram.h2d_bytes, b3, sizeof b3), (unsigned long long)r->pf_vram.requested,
               (unsigned long long)r->pf_vram.misses);
        double roof = r->vram.token_bytes ? r->copy_gbs * 1e9 / (double)r->vram.token_bytes : 0;
        printf("roofline     %s read per token on the GPU, copy %.0f GB/s: %.0f tok/s; decode at %.1f%% of it"
               " (%llu of %lld tokens as CUDA graph replays%s)\n",
               fm_human_bytes((double)r->vram.token_bytes, b2, sizeof b2), r->copy_gbs, roof,
               roof > 0 ? 100.0 * (double)b->n_gen / r->decode_s / roof : 0.0, (unsigned long long)r->vram.graph_steps,
               (long long)b->n_gen, r->vram.graphs ? "; the eager step and the capture before them, not timed" : "");
    }
    if (r->guessed)
        printf("prefetch     %.1f%% of the guessed next-layer experts were used; %llu read ahead, %llu of them used, "
               "%s read and never used (left out of the disk floor)\n",
               100.0 * (double)r->guessed_right / (double)r->guessed, (unsigned long long)r->spec_reads,
               (unsigned long long)r->spec_hits, fm_human_bytes((double)r->spec_wasted_bytes, b1, sizeof b1));
    printf("memory       peak RSS %s%s%s (before the RAM probe)\n", fm_human_bytes((double)r->rss, b1, sizeof b1),
           p->mem_budget ? " within a budget of " : "", p->mem_budget ? fm_human_bytes((double)p->mem_budget, b2, sizeof b2) : "");
    if (r->disk_busy >= 0)
        printf("disk         busy %.0f%% of the decode time, %.1f requests in flight on average while busy\n",
               100 * r->disk_busy, r->disk_queue);
    printf("machine      during decode other processes used %.0f%% of the CPUs and the hypervisor took %.0f%%%s\n",
           100 * r->cpu_other, 100 * r->cpu_steal, r->cpu_other + r->cpu_steal > 0.1 ? ": the figures above are contended" : "");
}

/* Parses "pread,direct,uring" into engines[]; returns the count, 0 on a bad name. */
static int parse_engines(const char *list, fm_io_engine *engines, int cap) {
    static const fm_io_engine all[] = {FM_IO_PREAD, FM_IO_DIRECT, FM_IO_URING, FM_IO_MMAP};
    int n = 0;
    const char *at = list;
    while (*at) {
        size_t len = strcspn(at, ",");
        bool found = false;
        for (size_t k = 0; k < sizeof all / sizeof *all; k++) {
            const char *name = fm_io_engine_name(all[k]);
            if (strlen(name) == len && !strncmp(at, name, len) && n < cap) {
                engines[n++] = all[k];
                found = true;
            }
        }
        if (!found) return 0;
        at += len;
        if (*at == ',') at++;
    }
    return n;
}

int fm_cli_bench(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},   {"prompt", required_argument, 0, OPT_PROMPT},
                                         {"gen", required_argument, 0, OPT_GEN},      {"cold", no_argument, 0, OPT_COLD},
                                         {"io-bench", no_argument, 0, OPT_IO_ONLY},   {"json", no_argument, 0, OPT_JSON},
                                         {"engines", optional_argument, 0, OPT_ENGINES}, FM_CLI_MODEL_OPTIONS,
                                         {"help", no_argument, 0, 'h'},               {0, 0, 0, 0}};
    const char *model = NULL;
    int64_t n_prompt = 64, n_gen = 16;
    bool cold = false, json = false, io_only = false;
    fm_io_engine engines[8];
    int n_engines = 0; /* 0: one run with --io's engine */
    fm_model_params p = fm_model_default_params();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:t:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("bench", c, optarg, &p);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (c) {
        case 'm': model = optarg; break;
        case OPT_PROMPT:
            if (!fm_cli_parse_i64(optarg, 1, 1 << 20, &n_prompt)) return fm_cli_usage_error("bench", "--prompt needs a positive integer");
            break;
        case OPT_GEN:
            if (!fm_cli_parse_i64(optarg, 1, 1 << 20, &n_gen)) return fm_cli_usage_error("bench", "--gen needs a positive integer");
            break;
        case OPT_COLD: cold = true; break;
        case OPT_IO_ONLY: io_only = true; break;
        case OPT_JSON: json = true; break;
        case OPT_ENGINES:
            n_engines = parse_engines(optarg ? optarg : "pread,direct,uring", engines, 8);
            if (!n_engines)
                return fm_cli_usage_error("bench", "--engines takes a comma-separated list of pread, direct, uring, mmap");
            break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("bench", "bad option");
        }
    }
    if (!model) return fm_cli_usage_error("bench", "-m MODEL is required");
    if (optind != argc) return fm_cli_usage_error("bench", "unexpected argument \"%s\"", argv[optind]);
    if (n_engines) p.io_engine = engines[0];
    fm_model *m = NULL;
    int rc = FM_EXIT_OK;
    bench_run runs[8];
    memset(runs, 0, sizeof runs);
    if (fm_model_open(model, &p, &m) != FM_OK) return fm_cli_fail("bench");
    const fm_config *cf = &m->cfg;
    const fm_packed_model *pm = m->packed;
    bench_setup b = {.model = model, .n_prompt = n_prompt, .n_gen = n_gen, .cold = cold,
                     .io_threads = p.io_threads ? p.io_threads : 4};
    int n_probe = (int)(2e9 / (double)pm->max_expert_stride); /* ~2 GB of reads, 16..512 of them */
    if (n_probe < 16) n_probe = 16;
    if (n_probe > 512) n_probe = 512;

    if (io_only) {
        io_bench(pm, n_probe, json);
        goto done;
    }

    if (!json) fprintf(stderr, "bench: measuring the floors (disk: %d random expert reads; RAM: 1 GiB)...\n", n_probe);
    b.disk_before = b.disk_gbs = probe_disk(pm, b.io_threads, n_probe, 12345);
    uint64_t expert_bytes_token = 0, embed_bytes = 0;
    for (int l = 0; l < cf->n_layers; l++) expert_bytes_token += pm->experts[l].stride * (uint64_t)m->n_experts_used;
    const fm_packed_tensor *emb = fm_packed_find(pm, "embed_tokens"), *head = fm_packed_find(pm, "lm_head");
    if (emb) embed_bytes = emb->n_bytes;
    b.touched_token = m->dense_bytes - embed_bytes - (head ? head->n_bytes : 0) + expert_bytes_token;

    if (!n_engines) {
        runs[0].asked = p.io_engine;
        if ((rc = measure(m, &b, &runs[0])) != FM_EXIT_OK) goto done;
        probe_disk_after(pm, n_probe, &b);
        b.ram_gbs = fm_ram_read_gbs(m->pool, (size_t)1 << 30, 3);
        apply_floors(&b, cf->n_layers, &runs[0]);
        if (json) {
            print_json(&b, m, &p, &runs[0]);
            printf("\n");
        } else {
            print_text(&b, m, &p, &runs[0]);
        }
        goto done;
    }

    /* --engines: the same measurement per engine, each on a freshly opened model (empty cache,
     * expert pages dropped first); the floors are measured once and shared by the rows */
    for (int k = 0; k < n_engines; k++) {
        if (k > 0) {
            fm_model_free(m);
            m = NULL;
            p.io_engine = engines[k];
            if (fm_model_open(model, &p, &m) != FM_OK) {
                rc = fm_cli_fail("bench");
                goto done;
            }
            cf = &m->cfg;
            pm = m->packed;
        }
        if (!json) fprintf(stderr, "bench: engine %s...\n", fm_io_engine_name(engines[k]));
        drop_expert_pages(pm);
        reset_peak_rss();
        runs[k].asked = engines[k];
        if ((rc = measure(m, &b, &runs[k])) != FM_EXIT_OK) goto done;
    }
    probe_disk_after(pm, n_probe, &b);
    b.ram_gbs = fm_ram_read_gbs(m->pool, (size_t)1 << 30, 3);
    for (int k = 0; k < n_engines; k++) apply_floors(&b, cf->n_layers, &runs[k]);
    if (json) {
        printf("[");
        for (int k = 0; k < n_engines; k++) {
            printf(k ? ",\n " : "");
            print_json(&b, m, &p, &runs[k]);
        }
        printf("]\n");
    } else {
        char b1[32], line[160];
        printf("model        %s (%d layers, %d experts per token), prompt %lld, decode %lld tokens%s\n", model, cf->n_layers,
               m->n_experts_used, (long long)n_prompt, (long long)n_gen, cold ? ", expert pages dropped before decoding" : "");
        printf("floors       disk %.2f GB/s (random expert reads, O_DIRECT; %.2f before the rows, %.2f after), RAM %.2f GB/s\n",
               b.disk_gbs, b.disk_before, b.disk_after, b.ram_gbs);
        printf("%-8s %12s %9s %9s %9s %9s %9s %9s %10s\n", "engine", "decode tok/s", "layer ms", "floor ms", "ratio",
               "wait ms", "hit rate", "disk GB", "peak RSS");
        for (int k = 0; k < n_engines; k++) {
            const bench_run *r = &runs[k];
            double per = 1e3 / (double)n_gen / cf->n_layers;
            printf("%-8s %12.3f %9.2f %9.2f %9.2f %9.2f %8.1f%% %9.2f %10s\n", fm_io_engine_name(r->asked),
                   (double)n_gen / r->decode_s, r->layer_ms, r->floor_ms, r->layer_ms / r->floor_ms, r->wait * per,
                   r->requested ? 100.0 * (double)r->hits / (double)r->requested : 0.0, (double)r->disk_bytes / 1e9,
                   fm_human_bytes((double)r->rss, b1, sizeof b1));
        }
        for (int k = 0; k < n_engines; k++)
            printf("%-8s %s\n", fm_io_engine_name(runs[k].asked), engine_line(&b, &runs[k], line, sizeof line));
    }
done:
    fm_model_free(m);
    return rc;
}
