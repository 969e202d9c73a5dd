/* A progress line on stderr for long work: on a terminal a bar redrawn at most every 100 ms with
 * bytes, rate and ETA; otherwise (logs) one plain line at every 10 % once the work has run 2 s.
 * Not thread-safe. */
#ifndef FM_UTIL_PROGRESS_H
#define FM_UTIL_PROGRESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct fm_progress {
    const char *label;
    uint64_t total, done;
    double t_start, t_drawn;
    int pct_printed;
    bool tty, enabled;
} fm_progress;

/* Starts a progress line for `total` units of bytes; enabled = false makes every call a no-op. */
void fm_progress_init(fm_progress *p, const char *label, uint64_t total, bool enabled);

/* Adds n units of work done and redraws if due. */
void fm_progress_add(fm_progress *p, uint64_t n);

/* Draws the final state and ends the line. */
void fm_progress_finish(fm_progress *p);

/* "12.34 GB" / "4.50 MB" / "800.0 KB" (decimal units) into buf; returns buf. */
const char *fm_human_bytes(double bytes, char *buf, size_t cap);

/* Seconds on a monotonic clock. */
double fm_time_now(void);

#endif
