#include "formats/npy.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/error.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "npy I/O assumes a little-endian host");

#define NPY_MAGIC "\x93NUMPY"
#define NPY_MAGIC_LEN 6
#define NPY_MAX_HEADER (1u << 20) /* v2.0 allows 4 GiB headers; no sane array needs more than this */

/* ---- writing ---------------------------------------------------------------------------------- */

static fm_status npy_write(const char *path, const char *descr, size_t esize, const void *data,
                           int n_dims, const int64_t *shape) {
    if (!path) return fm_error_set(FM_ERR_ARG, "npy write: path is NULL");
    if (n_dims < 0 || n_dims > FM_NPY_MAX_DIMS)
        return fm_error_set(FM_ERR_ARG, "%s: n_dims %d out of range 0..%d", path, n_dims,
                            FM_NPY_MAX_DIMS);
    if (n_dims > 0 && !shape) return fm_error_set(FM_ERR_ARG, "%s: shape is NULL", path);

    char header[512];
    int len = snprintf(header, sizeof header, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                       descr);
    int64_t n = 1;
    for (int i = 0; i < n_dims; i++) {
        if (shape[i] < 0)
            return fm_error_set(FM_ERR_ARG, "%s: shape[%d] = %" PRId64 " is negative", path, i, shape[i]);
        if (__builtin_mul_overflow(n, shape[i], &n))
            return fm_error_set(FM_ERR_ARG, "%s: element count overflows", path);
        len += snprintf(header + len, sizeof header - (size_t)len, i ? ", %" PRId64 : "%" PRId64,
                        shape[i]);
    }
    int64_t n_bytes;
    if (__builtin_mul_overflow(n, (int64_t)esize, &n_bytes))
        return fm_error_set(FM_ERR_ARG, "%s: byte count overflows", path);
    if (n > 0 && !data) return fm_error_set(FM_ERR_ARG, "%s: data is NULL", path);
    len += snprintf(header + len, sizeof header - (size_t)len, "%s), }", n_dims == 1 ? "," : "");
    /* Pad with spaces and end with '\n' so that magic + version + length + header is a multiple of 64. */
    int total = NPY_MAGIC_LEN + 2 + 2 + len + 1;
    int pad = (64 - total % 64) % 64;
    memset(header + len, ' ', (size_t)pad);
    len += pad;
    header[len++] = '\n';

    uint8_t pre[NPY_MAGIC_LEN + 4];
    memcpy(pre, NPY_MAGIC, NPY_MAGIC_LEN);
    pre[6] = 1;
    pre[7] = 0;
    pre[8] = (uint8_t)(len & 0xff);
    pre[9] = (uint8_t)(len >> 8);

    FILE *fp = fopen(path, "wb");
    if (!fp) return fm_error_set(FM_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    bool ok = fwrite(pre, 1, sizeof pre, fp) == sizeof pre &&
              fwrite(header, 1, (size_t)len, fp) == (size_t)len &&
              (n_bytes == 0 || fwrite(data, 1, (size_t)n_bytes, fp) == (size_t)n_bytes);
    int err = ok ? 0 : errno;
    if (fclose(fp) != 0 && ok) {
        ok = false;
        err = errno;
    }
    if (!ok) {
        remove(path);
        return fm_error_set(FM_ERR_IO, "%s: write failed: %s", path, err ? strerror(err) : "short write");
    }
    return FM_OK;
}

fm_status fm_npy_write_f32(const char *path, const float *data, int n_dims, const int64_t *shape) {
    return npy_write(path, "<f4", sizeof(float), data, n_dims, shape);
}

fm_status fm_npy_write_i32(const char *path, const int32_t *data, int n_dims, const int64_t *shape) {
    return npy_write(path, "<i4", sizeof(int32_t), data, n_dims, shape);
}

/* ---- header parsing (the python dict literal numpy writes) ------------------------------------ */

typedef struct npy_lex {
    const char *p, *end, *path;
} npy_lex;

static void npy_skip_ws(npy_lex *x) {
    while (x->p < x->end && (*x->p == ' ' || *x->p == '\t' || *x->p == '\n' || *x->p == '\r')) x->p++;
}

static bool npy_accept(npy_lex *x, char c) {
    npy_skip_ws(x);
    if (x->p < x->end && *x->p == c) {
        x->p++;
        return true;
    }
    return false;
}

static bool npy_accept_word(npy_lex *x, const char *w) {
    npy_skip_ws(x);
    size_t n = strlen(w);
    if ((size_t)(x->end - x->p) >= n && memcmp(x->p, w, n) == 0) {
        x->p += n;
        return true;
    }
    return false;
}

static fm_status npy_syntax(const npy_lex *x, const char *hdr, const char *what) {
    return fm_error_set(FM_ERR_FORMAT, "%s: malformed header: expected %s at byte %d", x->path, what,
                        (int)(x->p - hdr));
}

/* A quoted string (single or double quotes, no escapes) into buf; false if malformed / too long. */
static bool npy_string(npy_lex *x, char *buf, size_t cap) {
    npy_skip_ws(x);
    if (x->p >= x->end || (*x->p != '\'' && *x->p != '"')) return false;
    char q = *x->p++;
    size_t n = 0;
    while (x->p < x->end && *x->p != q) {
        if (*x->p == '\\' || n + 1 >= cap) return false;
        buf[n++] = *x->p++;
    }
    if (x->p >= x->end) return false;
    x->p++;
    buf[n] = '\0';
    return true;
}

static fm_status npy_parse_header(const char *path, const char *hdr, size_t len, fm_npy *a) {
    npy_lex x = {hdr, hdr + len, path};
    bool have_descr = false, have_order = false, have_shape = false, fortran = false;
    char descr[64] = "";
    if (!npy_accept(&x, '{')) return npy_syntax(&x, hdr, "'{'");
    while (!npy_accept(&x, '}')) {
        char key[32];
        if (!npy_string(&x, key, sizeof key)) return npy_syntax(&x, hdr, "a quoted key");
        if (!npy_accept(&x, ':')) return npy_syntax(&x, hdr, "':'");
        if (strcmp(key, "descr") == 0 && !have_descr) {
            npy_skip_ws(&x);
            if (x.p < x.end && *x.p == '[')
                return fm_error_set(FM_ERR_UNSUPPORTED, "%s: structured dtypes are not supported", path);
            if (!npy_string(&x, descr, sizeof descr)) return npy_syntax(&x, hdr, "a quoted descr");
            have_descr = true;
        } else if (strcmp(key, "fortran_order") == 0 && !have_order) {
            if (npy_accept_word(&x, "True")) fortran = true;
            else if (npy_accept_word(&x, "False")) fortran = false;
            else return npy_syntax(&x, hdr, "True or False");
            have_order = true;
        } else if (strcmp(key, "shape") == 0 && !have_shape) {
            if (!npy_accept(&x, '(')) return npy_syntax(&x, hdr, "'(' starting the shape");
            a->n_dims = 0;
            while (!npy_accept(&x, ')')) {
                npy_skip_ws(&x);
                if (x.p >= x.end || *x.p < '0' || *x.p > '9')
                    return npy_syntax(&x, hdr, "a non-negative integer in the shape");
                int64_t v = 0;
                while (x.p < x.end && *x.p >= '0' && *x.p <= '9') {
                    if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, *x.p - '0', &v))
                        return fm_error_set(FM_ERR_FORMAT, "%s: shape dimension overflows", path);
                    x.p++;
                }
                if (x.p < x.end && *x.p == 'L') x.p++; /* python 2 long */
                if (a->n_dims == FM_NPY_MAX_DIMS)
                    return fm_error_set(FM_ERR_UNSUPPORTED, "%s: more than %d dimensions", path,
                                        FM_NPY_MAX_DIMS);
                a->shape[a->n_dims++] = v;
                if (!npy_accept(&x, ',')) {
                    if (!npy_accept(&x, ')')) return npy_syntax(&x, hdr, "',' or ')' in the shape");
                    break;
                }
            }
            have_shape = true;
        } else {
            return fm_error_set(FM_ERR_FORMAT, "%s: malformed header: unexpected or repeated key '%s'",
                                path, key);
        }
        if (!npy_accept(&x, ',')) {
            if (!npy_accept(&x, '}')) return npy_syntax(&x, hdr, "',' or '}'");
            break;
        }
    }
    npy_skip_ws(&x);
    if (x.p != x.end) return npy_syntax(&x, hdr, "only padding after '}'");
    if (!have_descr || !have_order || !have_shape)
        return fm_error_set(FM_ERR_FORMAT, "%s: malformed header: missing key '%s'", path,
                            !have_descr ? "descr" : !have_order ? "fortran_order" : "shape");
    if (strcmp(descr, "<f4") != 0 && strcmp(descr, "<i4") != 0 && strcmp(descr, "<i8") != 0)
        return fm_error_set(FM_ERR_UNSUPPORTED,
                            "%s: unsupported dtype '%s' (supported: '<f4', '<i4', '<i8')", path, descr);
    if (fortran)
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s: fortran_order True is not supported (C order only)",
                            path);
    memcpy(a->descr, descr, strlen(descr) + 1);
    a->n_elements = 1;
    for (int i = 0; i < a->n_dims; i++)
        if (__builtin_mul_overflow(a->n_elements, a->shape[i], &a->n_elements))
            return fm_error_set(FM_ERR_FORMAT, "%s: element count overflows", path);
    return FM_OK;
}

/* ---- reading ---------------------------------------------------------------------------------- */

fm_status fm_npy_read(const char *path, fm_npy *out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_npy_read: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path) return fm_error_set(FM_ERR_ARG, "fm_npy_read: path is NULL");

    fm_status st;
    fm_npy a = {0};
    char *hdr = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* O_NONBLOCK: a FIFO must not block */
    if (fd < 0) return fm_error_set(FM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return fm_error_set(FM_ERR_IO, "%s: not a readable regular file", path);
    }
    FILE *fp = fdopen(fd, "rb");
    if (!fp) {
        close(fd);
        return fm_error_set(FM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    uint64_t file_size = (uint64_t)sb.st_size;

    uint8_t pre[12];
    if (file_size < 10 || fread(pre, 1, 10, fp) != 10) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: too short for a .npy file (%" PRIu64 " bytes)", path,
                          file_size);
        goto fail;
    }
    if (memcmp(pre, NPY_MAGIC, NPY_MAGIC_LEN) != 0) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: bad magic (not a .npy file)", path);
        goto fail;
    }
    uint64_t header_len, prefix;
    if (pre[6] == 1 && pre[7] == 0) {
        header_len = (uint64_t)pre[8] | (uint64_t)pre[9] << 8;
        prefix = 10;
    } else if (pre[6] == 2 && pre[7] == 0) {
        if (fread(pre + 10, 1, 2, fp) != 2) {
            st = fm_error_set(FM_ERR_FORMAT, "%s: truncated header length", path);
            goto fail;
        }
        header_len = (uint64_t)pre[8] | (uint64_t)pre[9] << 8 | (uint64_t)pre[10] << 16 |
                     (uint64_t)pre[11] << 24;
        prefix = 12;
    } else {
        st = fm_error_set(FM_ERR_UNSUPPORTED, "%s: .npy version %d.%d is not supported (1.0 and 2.0 are)",
                          path, pre[6], pre[7]);
        goto fail;
    }
    if (header_len > NPY_MAX_HEADER) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: header length %" PRIu64 " is too large", path, header_len);
        goto fail;
    }
    if (header_len > file_size - prefix) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: header length %" PRIu64 " runs past the end of the file",
                          path, header_len);
        goto fail;
    }
    hdr = malloc(header_len + 1);
    if (!hdr) {
        st = fm_error_set(FM_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    if (fread(hdr, 1, header_len, fp) != header_len) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot read the header", path);
        goto fail;
    }
    hdr[header_len] = '\0';
    st = npy_parse_header(path, hdr, header_len, &a);
    if (st != FM_OK) goto fail;

    size_t esize = strcmp(a.descr, "<i8") == 0 ? 8 : 4;
    int64_t n_bytes;
    if (__builtin_mul_overflow(a.n_elements, (int64_t)esize, &n_bytes)) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: byte count overflows", path);
        goto fail;
    }
    uint64_t have = file_size - prefix - header_len;
    if (have < (uint64_t)n_bytes) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: data truncated: %" PRId64 " elements need %" PRId64
                          " bytes, the file has %" PRIu64, path, a.n_elements, n_bytes, have);
        goto fail;
    }
    if (have > (uint64_t)n_bytes) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: %" PRIu64 " unexpected bytes after the data", path,
                          have - (uint64_t)n_bytes);
        goto fail;
    }
    a.data = malloc(n_bytes ? (size_t)n_bytes : 1);
    if (!a.data) {
        st = fm_error_set(FM_ERR_NOMEM, "%s: out of memory for %" PRId64 " bytes", path, n_bytes);
        goto fail;
    }
    if (fread(a.data, 1, (size_t)n_bytes, fp) != (size_t)n_bytes) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot read the data", path);
        goto fail;
    }
    free(hdr);
    fclose(fp);
    *out = a;
    return FM_OK;

fail:
    free(a.data);
    free(hdr);
    fclose(fp);
    return st;
}

void fm_npy_free(fm_npy *a) {
    if (!a) return;
    free(a->data);
    memset(a, 0, sizeof *a);
}
