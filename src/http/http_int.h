/*
 * Private to src/http: h2o and picohttpparser declarations.
 */
#ifndef TALLY_HTTP_INT_H
#define TALLY_HTTP_INT_H

#include <h2o.h>
#include <sys/types.h>

#include "http/http.h"

/*
 * picohttpparser is compiled into libh2o-evloop and its symbols are exported, but
 * Debian does not install its header; these are the two entry points we use, as
 * declared by picohttpparser.h of the h2o 2.2 release.
 */
struct phr_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
};
int phr_parse_request(const char *buf, size_t len, const char **method, size_t *method_len, const char **path,
                      size_t *path_len, int *minor_version, struct phr_header *headers, size_t *num_headers,
                      size_t last_len);
struct phr_chunked_decoder {
    size_t bytes_left_in_chunk;
    char consume_trailer;
    char _hex_count;
    char _state;
};
ssize_t phr_decode_chunked(struct phr_chunked_decoder *decoder, char *buf, size_t *bufsz);

struct tly_loop {
    h2o_evloop_t *h2o;
    h2o_multithread_queue_t *queue;
};

/* A tly_timer_t's private words hold one of these. */
typedef struct {
    h2o_timeout_entry_t entry;
    tly_loop_t *loop;
} timer_priv_t;

#endif
