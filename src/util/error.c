#include "util/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[1024];

fm_status fm_error_set(fm_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

fm_status fm_error_wrap(fm_status status, const char *fmt, ...) {
    char prefix[512], detail[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(detail, last_error, sizeof detail);
    snprintf(last_error, sizeof last_error, "%s: %s", prefix, detail);
    return status;
}

const char *fm_last_error(void) { return last_error; }

const char *fm_status_name(fm_status s) {
    switch (s) {
    case FM_OK: return "ok";
    case FM_ERR_IO: return "I/O error";
    case FM_ERR_FORMAT: return "malformed input";
    case FM_ERR_UNSUPPORTED: return "unsupported";
    case FM_ERR_NOMEM: return "out of memory";
    case FM_ERR_ARG: return "invalid argument";
    }
    return "unknown status";
}
