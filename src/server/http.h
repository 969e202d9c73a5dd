/* A small HTTP/1.1 server: the only part of `flashmoe serve` that touches sockets.
 *
 * What it speaks: request line + headers (CRLF line ends, no obs-fold), bodies by Content-Length
 * only (a request with Transfer-Encoding is answered 501), "Expect: 100-continue", keep-alive
 * (HTTP/1.1 default; HTTP/1.0 closes), fixed-length responses and chunked ones (for server-sent
 * events). What it refuses: heads larger than max_head_bytes (431), bodies larger than
 * max_body_bytes (413), malformed request lines or headers (400), versions other than 1.0/1.1 (505),
 * a request not received in full within request_timeout_ms (408, then close). A connection is one
 * thread (at most max_connections; more are answered 503 and closed). docs/SERVER.md says why this
 * is hand-written rather than a library.
 *
 * Threads: fm_http_start starts an accept thread; each connection's thread calls the handler once
 * per request, and the handler answers on that thread (it may block, e.g. streaming tokens, and may
 * use fm_http_wait to notice a client that hung up). Error answers the layer makes itself carry a
 * JSON body in OpenAI's error shape. */
#ifndef FM_SERVER_HTTP_H
#define FM_SERVER_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#include "flashmoe.h"

typedef struct fm_http_server fm_http_server;
typedef struct fm_http_request fm_http_request;

typedef struct fm_http_options {
    const char *host;        /* numeric IPv4 / IPv6 address or "localhost"; NULL = "127.0.0.1" */
    int port;                /* 0 = any free port (fm_http_port says which) */
    size_t max_head_bytes;   /* request line + headers; 0 = 16 KiB */
    size_t max_body_bytes;   /* 0 = 8 MiB */
    int max_connections;     /* open connections, each a thread; 0 = 128 */
    int request_timeout_ms;  /* a request must arrive in full within this, from its first byte; 0 = 30 s */
    int idle_timeout_ms;     /* a kept-alive connection may wait this long for its next request; 0 = 15 s */
    int send_timeout_ms;     /* one blocked send gives up after this (client stopped reading); 0 = 60 s */
} fm_http_options;

/* Called once per request on the connection's thread. It answers with fm_http_respond, or with
 * fm_http_stream_begin + fm_http_stream_write... + fm_http_stream_end; if it returns without a
 * complete answer the layer sends 500 (nothing sent yet) or closes the connection (a stream begun). */
typedef void (*fm_http_handler)(void *user, fm_http_request *req);

/* Binds host:port, listens and starts serving. On success *out owns the server (fm_http_stop).
 * Errors: FM_ERR_ARG (host not an address), FM_ERR_IO (bind / listen failed, e.g. port in use). */
fm_status fm_http_start(const fm_http_options *opt, fm_http_handler handler, void *user, fm_http_server **out);

/* The port the server listens on. */
int fm_http_port(const fm_http_server *s);

/* Stops accepting, shuts every open connection down (a handler blocked in fm_http_wait sees the
 * client gone), waits for all connection threads and frees the server (NULL is fine). Handlers
 * must not block forever on anything else. */
void fm_http_stop(fm_http_server *s);

/* The request's method ("GET", "POST", ...) and path (the target without "?query"). Valid during
 * the handler call. */
const char *fm_http_method(const fm_http_request *r);
const char *fm_http_path(const fm_http_request *r);

/* The value of a header (name matched case-insensitively; surrounding blanks removed), or NULL.
 * With repeated headers, the first. */
const char *fm_http_header(const fm_http_request *r, const char *name);

/* The body (NUL-terminated for convenience; it may contain NUL bytes: use *len). Never NULL. */
const char *fm_http_body(const fm_http_request *r, size_t *len);

/* Sends a complete answer: status, Content-Type (NULL: none), extra header lines (each ending in
 * "\r\n"; NULL: none) and len bytes of body. Errors: FM_ERR_IO (the client is gone; the connection
 * will be closed), FM_ERR_ARG (an answer was already sent). */
fm_status fm_http_respond(fm_http_request *r, int status, const char *content_type, const char *extra_headers,
                          const void *body, size_t len);

/* Starts a chunked answer (e.g. text/event-stream); then stream_write sends each piece at once as a
 * chunk (len 0: nothing) and stream_end sends the last chunk. Errors as for fm_http_respond. */
fm_status fm_http_stream_begin(fm_http_request *r, int status, const char *content_type, const char *extra_headers);
fm_status fm_http_stream_write(fm_http_request *r, const void *data, size_t len);
fm_status fm_http_stream_end(fm_http_request *r);

typedef enum fm_http_wait_result {
    FM_HTTP_WAIT_READY = 0,   /* `fd` is readable */
    FM_HTTP_WAIT_TIMEOUT = 1, /* nothing happened within timeout_ms */
    FM_HTTP_WAIT_CLOSED = 2,  /* the client hung up (or the server is stopping) */
} fm_http_wait_result;

/* Waits until `fd` (e.g. an eventfd a worker signals; -1: none) is readable, the client closes its
 * side of the connection, or timeout_ms passes (-1: no limit). Bytes a client pipelines meanwhile
 * do not count as closing. After FM_HTTP_WAIT_CLOSED nothing more is sent: the handler may return
 * without an answer and the connection is closed. */
fm_http_wait_result fm_http_wait(fm_http_request *r, int fd, int timeout_ms);

/* Has the client closed its side of the connection (or the server begun stopping)? Does not block
 * and changes nothing, so any thread may ask while the handler runs (e.g. a worker generating for
 * the request, between steps). */
bool fm_http_client_gone(const fm_http_request *r);

#endif
