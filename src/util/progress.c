#include "util/progress.h"

#include <stdio.h>
#include <time.h>
#include <unistd.h>

double fm_time_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void fm_progress_init(fm_progress *p, const char *label, uint64_t total, bool enabled) {
    p->label = label;
    p->total = total;
    p->done = 0;
    p->t_start = fm_time_now();
    p->t_drawn = 0;
    p->pct_printed = -1;
    p->enabled = enabled;
    p->tty = isatty(STDERR_FILENO);
}

static void draw(fm_progress *p, bool final) {
    double now = fm_time_now(), el = now - p->t_start;
    double frac = p->total ? (double)p->done / (double)p->total : 1.0;
    double rate = el > 0 ? (double)p->done / el : 0;
    if (p->tty) {
        char bar[31];
        int fill = (int)(frac * 30);
        for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
        bar[30] = 0;
        double eta = rate > 0 ? (double)(p->total - p->done) / rate : 0;
        fprintf(stderr, "\r%s [%s] %5.1f%%  %.1f/%.1f MB  %.0f MB/s  ETA %.0fs   ", p->label, bar, frac * 100,
                (double)p->done / 1e6, (double)p->total / 1e6, rate / 1e6, final ? 0.0 : eta);
        if (final) fputc('\n', stderr);
    } else if (el >= 2.0 || (final && p->pct_printed >= 0)) { /* logs: quiet for short work */
        int pct = (int)(frac * 10) * 10;
        if (pct > p->pct_printed) {
            fprintf(stderr, "%s: %d%% (%.1f MB, %.1f s)\n", p->label, pct, (double)p->done / 1e6, el);
            p->pct_printed = pct;
        }
    }
    p->t_drawn = now;
}

void fm_progress_add(fm_progress *p, uint64_t n) {
    if (!p->enabled) return;
    p->done += n;
    if (p->done > p->total) p->done = p->total;
    if (p->tty ? fm_time_now() - p->t_drawn >= 0.1 : true) draw(p, false);
}

void fm_progress_finish(fm_progress *p) {
    if (!p->enabled) return;
    p->done = p->total;
    draw(p, true);
}

const char *fm_human_bytes(double bytes, char *buf, size_t cap) {
    if (bytes >= 1e9) snprintf(buf, cap, "%.2f GB", bytes / 1e9);
    else if (bytes >= 1e6) snprintf(buf, cap, "%.2f MB", bytes / 1e6);
    else snprintf(buf, cap, "%.1f KB", bytes / 1e3);
    return buf;
}
