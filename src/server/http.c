/* The HTTP/1.1 server behind http.h: one accept thread, one thread per connection, strict limits. */
#include "server/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "util/error.h"

#define MAX_HEADERS 64
#define DRAIN_LIMIT (1u << 20) /* bytes read and dropped before closing after an error answer */

typedef struct conn conn;

struct fm_http_request {
    conn *c;
    char method[16];
    const char *path;
    const char *hname[MAX_HEADERS], *hvalue[MAX_HEADERS];
    int n_headers;
    char *body;
    size_t body_len;
    bool http10, keep_alive;
    int state; /* 0: nothing sent, 1: stream begun, 2: complete answer sent */
    bool broken; /* a send failed: close the connection */
};

enum { CONN_FREE = 0, CONN_RUNNING, CONN_DONE };

struct conn {
    fm_http_server *srv;
    int fd;    /* -1 once closed; changed under srv->mu */
    int state; /* CONN_*, under srv->mu */
    pthread_t th;
    char *buf; /* received bytes not yet consumed: [0, len) of cap */
    size_t len, cap;
    char *head; /* a NUL-separated copy of the current request's head */
};

struct fm_http_server {
    fm_http_options o;
    fm_http_handler handler;
    void *user;
    int lfd, port;
    int wake[2];
    pthread_t accept_th;
    bool accept_started;
    pthread_mutex_t mu;
    atomic_bool stopping;
    conn *conns;
    int n_conns;
};

/* ------------------------------------------------------------------ helpers */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *reason_phrase(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

static bool send_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return false; /* EPIPE, ECONNRESET, or EAGAIN after SO_SNDTIMEO */
        }
        p += n;
        len -= (size_t)n;
    }
    return true;
}

/* Closes after telling the client we are done: half-close, then read and drop what it still sends
 * (bounded), so that an unread request body does not turn our answer into a connection reset. */
static void linger_close(int fd) {
    shutdown(fd, SHUT_WR);
    char scratch[4096];
    size_t total = 0;
    int64_t deadline = now_ms() + 500;
    while (total < DRAIN_LIMIT) {
        int64_t left = deadline - now_ms();
        if (left <= 0) break;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)left);
        if (r <= 0) break;
        ssize_t n = recv(fd, scratch, sizeof scratch, 0);
        if (n <= 0) break;
        total += (size_t)n;
    }
    close(fd);
}

/* An answer the layer makes itself, with an OpenAI-shaped error body (msg: ASCII, no quotes). */
static bool send_error(int fd, int status, const char *msg, bool keep_alive, const char *extra) {
    char body[512], head[512];
    int bl = snprintf(body, sizeof body,
                      "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,\"code\":null}}\n", msg,
                      status >= 500 ? "server_error" : "invalid_request_error");
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: %s\r\n%s\r\n",
                      status, reason_phrase(status), bl, keep_alive ? "keep-alive" : "close", extra ? extra : "");
    return send_all(fd, head, (size_t)hl) && send_all(fd, body, (size_t)bl);
}

static bool is_tchar(unsigned char ch) {
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')) return true;
    return ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

/* Does the comma-separated header value contain `token` (case-insensitive)? */
static bool has_token(const char *v, const char *token) {
    size_t tl = strlen(token);
    while (v && *v) {
        while (*v == ' ' || *v == '\t' || *v == ',') v++;
        size_t n = strcspn(v, ",");
        size_t m = n;
        while (m && (v[m - 1] == ' ' || v[m - 1] == '\t')) m--;
        if (m == tl && !strncasecmp(v, token, tl)) return true;
        v += n;
    }
    return false;
}

/* ------------------------------------------------------------------ reading requests */

enum { READ_OK = 0, READ_CLOSE = 1, READ_ERROR = 2 };

/* Waits for a whole head in c->buf. *head_len gets its length (through the blank line). On
 * READ_ERROR *status is the answer to send (0: just close). */
static int read_head(conn *c, size_t *head_len, int *status) {
    fm_http_server *s = c->srv;
    size_t max_head = s->o.max_head_bytes;
    int64_t deadline = c->len ? now_ms() + s->o.request_timeout_ms : now_ms() + s->o.idle_timeout_ms;
    bool started = c->len > 0;
    size_t scanned = 0;
    *status = 0;
    for (;;) {
        /* a client may send empty lines before a request line (RFC 9112 2.2) */
        while (c->len >= 2 && c->buf[0] == '\r' && c->buf[1] == '\n') {
            memmove(c->buf, c->buf + 2, c->len - 2);
            c->len -= 2;
            scanned = 0;
        }
        if (c->len >= 4) {
            for (size_t i = scanned; i + 4 <= c->len; i++)
                if (!memcmp(c->buf + i, "\r\n\r\n", 4)) {
                    *head_len = i + 4;
                    return READ_OK;
                }
            scanned = c->len - 3;
        }
        if (c->len >= max_head) {
            *status = 431;
            return READ_ERROR;
        }
        if (atomic_load(&s->stopping)) return READ_CLOSE;
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            if (!started) return READ_CLOSE; /* idle keep-alive connection: close quietly */
            *status = 408;
            return READ_ERROR;
        }
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(left > 1000 ? 1000 : left));
        if (r < 0 && errno != EINTR) return READ_CLOSE;
        if (r <= 0) continue;
        ssize_t n = recv(c->fd, c->buf + c->len, max_head - c->len, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) return READ_CLOSE;
        if (!started) {
            started = true;
            deadline = now_ms() + s->o.request_timeout_ms;
        }
        c->len += (size_t)n;
    }
}

/* Parses the head (copied to c->head, NUL-separated) into r. Returns 0 or the error status. */
static int parse_head(conn *c, size_t head_len, fm_http_request *r, const char **why) {
    char *h = c->head;
    memcpy(h, c->buf, head_len);
    h[head_len] = 0;
    *why = "malformed request line";
    if (memchr(h, 0, head_len)) return 400; /* no NUL anywhere in a head */
    /* request line: METHOD SP TARGET SP VERSION CRLF */
    char *eol = strstr(h, "\r\n");
    if (!eol) return 400;
    *eol = 0;
    char *sp1 = strchr(h, ' ');
    if (!sp1 || sp1 == h || sp1 - h >= (ptrdiff_t)sizeof r->method) return 400;
    for (char *p = h; p < sp1; p++)
        if (*p < 'A' || *p > 'Z') return 400;
    memcpy(r->method, h, (size_t)(sp1 - h));
    r->method[sp1 - h] = 0;
    char *target = sp1 + 1;
    char *sp2 = strchr(target, ' ');
    if (!sp2 || sp2 == target || *target != '/') return 400;
    for (char *p = target; p < sp2; p++)
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f) return 400;
    *sp2 = 0;
    target[strcspn(target, "?#")] = 0;
    r->path = target;
    const char *ver = sp2 + 1;
    if (!strcmp(ver, "HTTP/1.1")) {
        r->http10 = false;
    } else if (!strcmp(ver, "HTTP/1.0")) {
        r->http10 = true;
    } else {
        bool looks = !strncmp(ver, "HTTP/", 5) && ver[5] >= '0' && ver[5] <= '9' && ver[6] == '.' && ver[7] >= '0' &&
                     ver[7] <= '9' && !ver[8];
        *why = looks ? "only HTTP/1.1 and HTTP/1.0 are supported" : "malformed request line";
        return looks ? 505 : 400;
    }
    /* header fields */
    char *line = eol + 2;
    r->n_headers = 0;
    *why = "malformed header field";
    while (*line) {
        char *e = strstr(line, "\r\n");
        if (!e) return 400;
        if (e == line) break; /* the blank line */
        *e = 0;
        if (*line == ' ' || *line == '\t') return 400; /* obsolete line folding */
        char *colon = strchr(line, ':');
        if (!colon || colon == line) return 400;
        for (char *p = line; p < colon; p++)
            if (!is_tchar((unsigned char)*p)) return 400;
        *colon = 0;
        char *v = colon + 1;
        while (*v == ' ' || *v == '\t') v++;
        char *end = v + strlen(v);
        while (end > v && (end[-1] == ' ' || end[-1] == '\t')) end--;
        *end = 0;
        for (char *p = v; p < end; p++) {
            unsigned char ch = (unsigned char)*p;
            if ((ch < 0x20 && ch != '\t') || ch == 0x7f) return 400;
        }
        if (r->n_headers == MAX_HEADERS) {
            *why = "too many header fields";
            return 431;
        }
        r->hname[r->n_headers] = line;
        r->hvalue[r->n_headers] = v;
        r->n_headers++;
        line = e + 2;
    }
    return 0;
}

/* Reads the body of `len` bytes into a malloc'd buffer; part of it may already be in c->buf after
 * the head. Returns READ_OK, READ_CLOSE (gone / timed out / out of memory). */
static int read_body(conn *c, size_t head_len, size_t len, fm_http_request *r) {
    r->body = malloc(len + 1);
    if (!r->body) return READ_CLOSE;
    size_t have = c->len - head_len;
    size_t take = have < len ? have : len;
    memcpy(r->body, c->buf + head_len, take);
    /* what follows the body (a pipelined request) stays in c->buf */
    memmove(c->buf, c->buf + head_len + take, c->len - head_len - take);
    c->len -= head_len + take;
    size_t got = take;
    int64_t deadline = now_ms() + c->srv->o.request_timeout_ms;
    while (got < len) {
        if (atomic_load(&c->srv->stopping)) return READ_CLOSE;
        int64_t left = deadline - now_ms();
        if (left <= 0) return READ_CLOSE;
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        int pr = poll(&p, 1, (int)(left > 1000 ? 1000 : left));
        if (pr < 0 && errno != EINTR) return READ_CLOSE;
        if (pr <= 0) continue;
        ssize_t n = recv(c->fd, r->body + got, len - got, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) return READ_CLOSE;
        got += (size_t)n;
    }
    r->body[len] = 0;
    r->body_len = len;
    return READ_OK;
}

/* One request on the connection. Returns true to keep the connection open for the next. */
static bool serve_one(conn *c) {
    fm_http_server *s = c->srv;
    size_t head_len;
    int status;
    int rd = read_head(c, &head_len, &status);
    if (rd == READ_CLOSE) return false;
    if (rd == READ_ERROR) {
        if (status) send_error(c->fd, status, status == 431 ? "request head too large" : "request not received in time", false, NULL);
        return false;
    }
    fm_http_request r = {.c = c};
    const char *why;
    status = parse_head(c, head_len, &r, &why);
    if (status) {
        send_error(c->fd, status, why, false, NULL);
        return false;
    }
    /* framing: Content-Length only */
    const char *cl = NULL;
    bool te = false;
    for (int i = 0; i < r.n_headers; i++) {
        if (!strcasecmp(r.hname[i], "transfer-encoding")) te = true;
        if (!strcasecmp(r.hname[i], "content-length")) {
            if (cl && strcmp(cl, r.hvalue[i])) {
                send_error(c->fd, 400, "conflicting Content-Length fields", false, NULL);
                return false;
            }
            cl = r.hvalue[i];
        }
    }
    if (te) {
        send_error(c->fd, 501, "Transfer-Encoding in requests is not supported: send Content-Length", false, NULL);
        return false;
    }
    uint64_t body_len = 0;
    if (cl) {
        size_t nd = strlen(cl);
        if (!nd || nd > 19 || strspn(cl, "0123456789") != nd) {
            send_error(c->fd, 400, "malformed Content-Length", false, NULL);
            return false;
        }
        body_len = strtoull(cl, NULL, 10);
    }
    if (body_len > s->o.max_body_bytes) {
        char msg[128];
        snprintf(msg, sizeof msg, "request body too large (the limit is %zu bytes)", s->o.max_body_bytes);
        send_error(c->fd, 413, msg, false, NULL);
        return false;
    }
    const char *conn_h = fm_http_header(&r, "connection");
    r.keep_alive = !r.http10 && !has_token(conn_h, "close");
    const char *expect = fm_http_header(&r, "expect");
    if (expect) {
        if (strcasecmp(expect, "100-continue")) {
            send_error(c->fd, 417, "unsupported Expect value", false, NULL);
            return false;
        }
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (!r.http10 && body_len && c->len == head_len && !send_all(c->fd, cont, sizeof cont - 1)) return false;
    }
    if (read_body(c, head_len, (size_t)body_len, &r) != READ_OK) {
        free(r.body);
        return false;
    }
    s->handler(s->user, &r);
    free(r.body);
    if (r.state == 0 && !r.broken) {
        send_error(c->fd, 500, "the request was not answered", false, NULL);
        return false;
    }
    return r.state == 2 && !r.broken && r.keep_alive && !atomic_load(&s->stopping);
}

static void *conn_main(void *arg) {
    conn *c = arg;
    fm_http_server *s = c->srv;
    bool ok = c->buf && c->head;
    while (ok) ok = serve_one(c);
    pthread_mutex_lock(&s->mu);
    int fd = c->fd;
    c->fd = -1;
    pthread_mutex_unlock(&s->mu);
    linger_close(fd);
    pthread_mutex_lock(&s->mu);
    c->state = CONN_DONE;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ------------------------------------------------------------------ accepting */

static void *accept_main(void *arg) {
    fm_http_server *s = arg;
    while (!atomic_load(&s->stopping)) {
        struct pollfd p[2] = {{.fd = s->lfd, .events = POLLIN}, {.fd = s->wake[0], .events = POLLIN}};
        int r = poll(p, 2, -1);
        if (atomic_load(&s->stopping)) break;
        if (r <= 0 || !(p[0].revents & POLLIN)) continue;
        int fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) usleep(10000);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct timeval tv = {.tv_sec = s->o.send_timeout_ms / 1000, .tv_usec = (s->o.send_timeout_ms % 1000) * 1000};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        conn *c = NULL;
        pthread_mutex_lock(&s->mu);
        for (int i = 0; i < s->n_conns; i++) {
            if (s->conns[i].state == CONN_DONE) {
                pthread_join(s->conns[i].th, NULL);
                s->conns[i].state = CONN_FREE;
            }
            if (!c && s->conns[i].state == CONN_FREE) c = &s->conns[i];
        }
        if (c) {
            if (!c->buf) c->buf = malloc(s->o.max_head_bytes + 1);
            if (!c->head) c->head = malloc(s->o.max_head_bytes + 1);
            c->fd = fd;
            c->len = 0;
            c->state = CONN_RUNNING;
            if (pthread_create(&c->th, NULL, conn_main, c) != 0) {
                c->state = CONN_FREE;
                c->fd = -1;
                c = NULL;
            }
        }
        pthread_mutex_unlock(&s->mu);
        if (!c) { /* at the connection limit (or no thread): answer and close */
            struct timeval quick = {.tv_sec = 0, .tv_usec = 100000};
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &quick, sizeof quick);
            send_error(fd, 503, "too many open connections", false, "Retry-After: 1\r\n");
            shutdown(fd, SHUT_WR);
            char scratch[4096]; /* what the client already sent: unread bytes would turn close into a reset */
            while (recv(fd, scratch, sizeof scratch, MSG_DONTWAIT) > 0) {
            }
            close(fd);
        }
    }
    return NULL;
}

fm_status fm_http_start(const fm_http_options *opt, fm_http_handler handler, void *user, fm_http_server **out) {
    *out = NULL;
    fm_http_server *s = calloc(1, sizeof *s);
    if (!s) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    s->o = opt ? *opt : (fm_http_options){0};
    if (!s->o.host) s->o.host = "127.0.0.1";
    if (!s->o.max_head_bytes) s->o.max_head_bytes = 16384;
    if (!s->o.max_body_bytes) s->o.max_body_bytes = 8u << 20;
    if (s->o.max_connections <= 0) s->o.max_connections = 128;
    if (s->o.request_timeout_ms <= 0) s->o.request_timeout_ms = 30000;
    if (s->o.idle_timeout_ms <= 0) s->o.idle_timeout_ms = 15000;
    if (s->o.send_timeout_ms <= 0) s->o.send_timeout_ms = 60000;
    s->handler = handler;
    s->user = user;
    s->lfd = -1;
    s->wake[0] = s->wake[1] = -1;
    pthread_mutex_init(&s->mu, NULL);
    atomic_init(&s->stopping, false);
    fm_status st = FM_OK;
    struct sockaddr_storage ss = {0};
    socklen_t sl;
    const char *host = !strcmp(s->o.host, "localhost") ? "127.0.0.1" : s->o.host;
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (s->o.port < 0 || s->o.port > 65535) {
        st = fm_error_set(FM_ERR_ARG, "port %d is out of range", s->o.port);
        goto fail;
    }
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)s->o.port);
        sl = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)s->o.port);
        sl = sizeof *a6;
    } else {
        st = fm_error_set(FM_ERR_ARG, "host \"%s\" is not a numeric IPv4 or IPv6 address", s->o.host);
        goto fail;
    }
    s->conns = calloc((size_t)s->o.max_connections, sizeof *s->conns);
    if (!s->conns) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    s->n_conns = s->o.max_connections;
    for (int i = 0; i < s->n_conns; i++) {
        s->conns[i].srv = s;
        s->conns[i].fd = -1;
    }
    if (pipe2(s->wake, O_CLOEXEC) != 0) {
        st = fm_error_set(FM_ERR_IO, "pipe: %s", strerror(errno));
        goto fail;
    }
    s->lfd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (s->lfd < 0 || setsockopt(s->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(s->lfd, (struct sockaddr *)&ss, sl) != 0 || listen(s->lfd, 128) != 0) {
        st = fm_error_set(FM_ERR_IO, "cannot listen on %s port %d: %s", s->o.host, s->o.port, strerror(errno));
        goto fail;
    }
    struct sockaddr_storage bound;
    socklen_t bl = sizeof bound;
    getsockname(s->lfd, (struct sockaddr *)&bound, &bl);
    s->port = ntohs(bound.ss_family == AF_INET ? ((struct sockaddr_in *)&bound)->sin_port
                                               : ((struct sockaddr_in6 *)&bound)->sin6_port);
    if (pthread_create(&s->accept_th, NULL, accept_main, s) != 0) {
        st = fm_error_set(FM_ERR_IO, "cannot start the accept thread");
        goto fail;
    }
    s->accept_started = true;
    *out = s;
    return FM_OK;
fail:
    fm_http_stop(s);
    return st;
}

int fm_http_port(const fm_http_server *s) { return s ? s->port : 0; }

void fm_http_stop(fm_http_server *s) {
    if (!s) return;
    atomic_store(&s->stopping, true);
    if (s->wake[1] >= 0) {
        ssize_t w = write(s->wake[1], "x", 1);
        (void)w;
    }
    if (s->accept_started) pthread_join(s->accept_th, NULL);
    if (s->lfd >= 0) close(s->lfd);
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n_conns; i++)
        if (s->conns[i].state == CONN_RUNNING && s->conns[i].fd >= 0) shutdown(s->conns[i].fd, SHUT_RDWR);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < s->n_conns; i++) {
        pthread_mutex_lock(&s->mu);
        bool started = s->conns[i].state != CONN_FREE;
        pthread_mutex_unlock(&s->mu);
        if (started) pthread_join(s->conns[i].th, NULL);
        free(s->conns[i].buf);
        free(s->conns[i].head);
    }
    free(s->conns);
    if (s->wake[0] >= 0) close(s->wake[0]);
    if (s->wake[1] >= 0) close(s->wake[1]);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* ------------------------------------------------------------------ requests and answers */

const char *fm_http_method(const fm_http_request *r) { return r->method; }
const char *fm_http_path(const fm_http_request *r) { return r->path; }

const char *fm_http_header(const fm_http_request *r, const char *name) {
    for (int i = 0; i < r->n_headers; i++)
        if (!strcasecmp(r->hname[i], name)) return r->hvalue[i];
    return NULL;
}

const char *fm_http_body(const fm_http_request *r, size_t *len) {
    if (len) *len = r->body_len;
    return r->body ? r->body : "";
}

static fm_status send_head(fm_http_request *r, int status, const char *content_type, const char *extra, bool chunked,
                           size_t len, char *buf, size_t cap, size_t *n) {
    char ct[256] = "", framing[64];
    if (content_type) snprintf(ct, sizeof ct, "Content-Type: %s\r\n", content_type);
    if (chunked) snprintf(framing, sizeof framing, "%s", r->http10 ? "" : "Transfer-Encoding: chunked\r\n");
    else snprintf(framing, sizeof framing, "Content-Length: %zu\r\n", len);
    if (chunked && r->http10) r->keep_alive = false; /* the end of the stream is the end of the connection */
    int k = snprintf(buf, cap, "HTTP/1.1 %d %s\r\n%s%sConnection: %s\r\n%s\r\n", status, reason_phrase(status), ct,
                     framing, r->keep_alive ? "keep-alive" : "close", extra ? extra : "");
    if (k < 0 || (size_t)k >= cap) return fm_error_set(FM_ERR_ARG, "response head too long");
    *n = (size_t)k;
    return FM_OK;
}

fm_status fm_http_respond(fm_http_request *r, int status, const char *content_type, const char *extra_headers,
                          const void *body, size_t len) {
    if (r->state != 0) return fm_error_set(FM_ERR_ARG, "an answer was already sent");
    char head[2048];
    size_t hn;
    fm_status st = send_head(r, status, content_type, extra_headers, false, len, head, sizeof head, &hn);
    if (st != FM_OK) return st;
    r->state = 2;
    bool ok;
    if (len <= 65536) { /* one write for small answers */
        char *all = malloc(hn + len);
        if (!all) {
            r->broken = true;
            return fm_error_set(FM_ERR_NOMEM, "out of memory");
        }
        memcpy(all, head, hn);
        if (len) memcpy(all + hn, body, len);
        ok = send_all(r->c->fd, all, hn + len);
        free(all);
    } else {
        ok = send_all(r->c->fd, head, hn) && send_all(r->c->fd, body, len);
    }
    if (!ok) {
        r->broken = true;
        return fm_error_set(FM_ERR_IO, "the client is gone");
    }
    return FM_OK;
}

fm_status fm_http_stream_begin(fm_http_request *r, int status, const char *content_type, const char *extra_headers) {
    if (r->state != 0) return fm_error_set(FM_ERR_ARG, "an answer was already sent");
    char head[2048];
    size_t hn;
    fm_status st = send_head(r, status, content_type, extra_headers, true, 0, head, sizeof head, &hn);
    if (st != FM_OK) return st;
    r->state = 1;
    if (!send_all(r->c->fd, head, hn)) {
        r->broken = true;
        return fm_error_set(FM_ERR_IO, "the client is gone");
    }
    return FM_OK;
}

fm_status fm_http_stream_write(fm_http_request *r, const void *data, size_t len) {
    if (r->state != 1) return fm_error_set(FM_ERR_ARG, "no stream was begun");
    if (r->broken) return fm_error_set(FM_ERR_IO, "the client is gone");
    if (!len) return FM_OK;
    bool ok;
    if (r->http10) {
        ok = send_all(r->c->fd, data, len);
    } else {
        char *buf = malloc(len + 32);
        if (!buf) return fm_error_set(FM_ERR_NOMEM, "out of memory");
        int k = snprintf(buf, 32, "%zx\r\n", len);
        memcpy(buf + k, data, len);
        memcpy(buf + k + len, "\r\n", 2);
        ok = send_all(r->c->fd, buf, (size_t)k + len + 2);
        free(buf);
    }
    if (!ok) {
        r->broken = true;
        return fm_error_set(FM_ERR_IO, "the client is gone");
    }
    return FM_OK;
}

fm_status fm_http_stream_end(fm_http_request *r) {
    if (r->state != 1) return fm_error_set(FM_ERR_ARG, "no stream was begun");
    r->state = 2;
    if (r->broken) return fm_error_set(FM_ERR_IO, "the client is gone");
    if (!r->http10 && !send_all(r->c->fd, "0\r\n\r\n", 5)) {
        r->broken = true;
        return fm_error_set(FM_ERR_IO, "the client is gone");
    }
    return FM_OK;
}

fm_http_wait_result fm_http_wait(fm_http_request *r, int fd, int timeout_ms) {
    if (r->broken) return FM_HTTP_WAIT_CLOSED;
    if (atomic_load(&r->c->srv->stopping)) {
        r->broken = true;
        return FM_HTTP_WAIT_CLOSED;
    }
    struct pollfd p[2] = {{.fd = r->c->fd, .events = POLLRDHUP}, {.fd = fd, .events = POLLIN}};
    int n = poll(p, fd >= 0 ? 2 : 1, timeout_ms);
    if (atomic_load(&r->c->srv->stopping)) {
        r->broken = true;
        return FM_HTTP_WAIT_CLOSED;
    }
    if (n <= 0) return FM_HTTP_WAIT_TIMEOUT;
    if (p[0].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) {
        r->broken = true; /* nothing more is sent on this connection */
        return FM_HTTP_WAIT_CLOSED;
    }
    if (fd >= 0 && (p[1].revents & POLLIN)) return FM_HTTP_WAIT_READY;
    return FM_HTTP_WAIT_TIMEOUT;
}

bool fm_http_client_gone(const fm_http_request *r) {
    if (atomic_load(&r->c->srv->stopping)) return true;
    struct pollfd p = {.fd = r->c->fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}
