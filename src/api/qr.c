/*
 * qr.c: a QR code (SVG) of a poll's share link, for the web app's share page and
 * presenter mode. The link is "<public_url>/p/<poll_id>" when --public-url is set, else
 * "http://<Host>/p/<poll_id>" (a Host header that is not a plain host[:port] falls back to
 * "localhost"). Encoded with libqrencode (level M, 8-bit, case-sensitive) and drawn as one
 * path of unit squares with a 4-module quiet zone; the viewBox is in modules.
 */
#include <errno.h>
#include <qrencode.h>
#include <stdio.h>
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"

#define QR_QUIET 4
#define QR_HOST_MAX 255

static bool host_ok(tly_str_t h)
{
    if (h.ptr == NULL || h.len == 0 || h.len > QR_HOST_MAX)
        return false;
    for (size_t i = 0; i < h.len; i++) {
        char c = h.ptr[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == ':' ||
                  c == '-' || c == '[' || c == ']';
        if (!ok)
            return false;
    }
    return true;
}

void api_polls_qr(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, false, &caller))
        return;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return;

    /* the share link */
    char link[2048];
    const char *pub = app->conf->public_url;
    int n;
    if (pub != NULL && pub[0] != '\0') {
        size_t plen = strlen(pub);
        while (plen > 0 && pub[plen - 1] == '/')
            plen--;
        n = snprintf(link, sizeof(link), "%.*s/p/%s", (int)plen, pub, p->poll_id);
    } else {
        tly_str_t host = tly_req_header(req, "host");
        if (host_ok(host))
            n = snprintf(link, sizeof(link), "http://%.*s/p/%s", (int)host.len, host.ptr, p->poll_id);
        else
            n = snprintf(link, sizeof(link), "http://localhost/p/%s", p->poll_id);
    }
    if (n < 0 || (size_t)n >= sizeof(link)) {
        api_respond_error(req, 500, "INTERNAL", "the share link is too long to encode", NULL);
        return;
    }

    QRcode *qr = QRcode_encodeString(link, 0, QR_ECLEVEL_M, QR_MODE_8, 1);
    if (qr == NULL) {
        if (errno == ENOMEM) {
            tly_req_add_header(req, "Retry-After", "1");
            api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        } else {
            api_respond_error(req, 500, "INTERNAL", "the share link cannot be encoded as a QR code", NULL);
        }
        return;
    }

    /* One path; each horizontal run of dark modules is a rectangle of height 1. A run is
     * at most "M177 177h177v1h-177z" (20 bytes); there are at most w*(w+1)/2 runs. */
    int w = qr->width;
    int size = w + 2 * QR_QUIET;
    size_t cap = 512 + (size_t)w * (size_t)(w + 1) / 2 * 24;
    char *buf = tly_req_alloc(req, cap);
    if (buf == NULL) {
        QRcode_free(qr);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    size_t len = (size_t)snprintf(buf, cap,
                                  "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                                  "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 %d %d\" "
                                  "width=\"%d\" height=\"%d\" shape-rendering=\"crispEdges\" role=\"img\" "
                                  "aria-label=\"QR code of the poll's link\">"
                                  "<rect width=\"%d\" height=\"%d\" fill=\"#fff\"/>"
                                  "<path fill=\"#000\" d=\"",
                                  size, size, size * 8, size * 8, size, size);
    for (int y = 0; y < w; y++) {
        const unsigned char *row = qr->data + (size_t)y * (size_t)w;
        for (int x = 0; x < w;) {
            if (!(row[x] & 1)) {
                x++;
                continue;
            }
            int start = x;
            while (x < w && (row[x] & 1))
                x++;
            int run = x - start;
            len += (size_t)snprintf(buf + len, cap - len, "M%d %dh%dv1h-%dz", start + QR_QUIET, y + QR_QUIET, run, run);
        }
    }
    len += (size_t)snprintf(buf + len, cap - len, "\"/></svg>\n");
    QRcode_free(qr);

    tly_req_add_header(req, "Cache-Control", "no-cache");
    tly_req_add_header(req, "X-Content-Type-Options", "nosniff");
    tly_req_add_header(req, "Content-Security-Policy", "default-src 'none'");
    tly_req_respond(req, 200, "image/svg+xml", buf, len);
}
