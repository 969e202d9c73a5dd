/* Error reporting shared by every module.
 *
 * Library functions return an fm_status (0 = FM_OK, negative = failure) or NULL, and on failure
 * leave one human-readable line in a thread-local buffer: fm_error_set() writes it, fm_last_error()
 * reads it. The line names the file / tensor / field at fault, so the CLI can print it as is. */
#ifndef FM_UTIL_ERROR_H
#define FM_UTIL_ERROR_H

#include "flashmoe.h"

/* Formats the thread's last error message (printf-style) and returns `status`, so that a failing
 * function can end with `return fm_error_set(FM_ERR_FORMAT, "...", ...);`. */
fm_status fm_error_set(fm_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes the current message with "context: " (e.g. the file name), keeping the detail. */
fm_status fm_error_wrap(fm_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
