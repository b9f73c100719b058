/*
 * addr.c: client addresses. The key an address counts under (connection, rate-limit and
 * one-ballot-per-address limits), and the trusted proxies whose X-Forwarded-For names the
 * client: behind a load balancer every TCP peer is the balancer, so without it per-address
 * limits would lump every voter together.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/http.h"

/* addr as 16 bytes (IPv4 as IPv4-mapped IPv6, whichever way it was written) */
static bool parse_addr(const char *s, size_t len, uint8_t out[16])
{
    char buf[INET6_ADDRSTRLEN + 1];
    if (len == 0 || len >= sizeof(buf))
        return false;
    memcpy(buf, s, len);
    buf[len] = '\0';
    struct in_addr a4;
    if (inet_pton(AF_INET, buf, &a4) == 1) {
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, &a4, 4);
        return true;
    }
    return inet_pton(AF_INET6, buf, out) == 1;
}

static bool is_v4(const uint8_t a[16])
{
    static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a, prefix, 12) == 0;
}

void tly_addr_key(const char *addr, char *out, size_t cap)
{
    uint8_t a[16];
    if (!parse_addr(addr, strlen(addr), a))
        snprintf(out, cap, "ip:%s", addr);
    else if (is_v4(a))
        snprintf(out, cap, "ip:%u.%u.%u.%u", a[12], a[13], a[14], a[15]);
    else /* one host usually holds a whole /64 */
        snprintf(out, cap, "ip6:%02x%02x:%02x%02x:%02x%02x:%02x%02x::/64", a[0], a[1], a[2], a[3], a[4], a[5], a[6],
                 a[7]);
}

int tly_proxies_parse(const char *spec, tly_proxies_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    const char *p = spec;
    while (*p != '\0') {
        while (*p == ' ' || *p == ',')
            p++;
        if (*p == '\0')
            break;
        size_t len = strcspn(p, " ,");
        const char *slash = memchr(p, '/', len);
        size_t alen = slash ? (size_t)(slash - p) : len;
        tly_cidr_t c;
        if (out->n == TLY_PROXIES_MAX) {
            snprintf(err, errlen, "more than %d trusted proxies", TLY_PROXIES_MAX);
            return -1;
        }
        if (!parse_addr(p, alen, c.addr)) {
            snprintf(err, errlen, "not an IP address: %.*s", (int)alen, p);
            return -1;
        }
        unsigned max = is_v4(c.addr) ? 32 : 128;
        c.bits = 128;
        if (slash != NULL) {
            char *end;
            long bits = strtol(slash + 1, &end, 10);
            if (end != p + len || slash + 1 == end || bits < 0 || bits > (long)max) {
                snprintf(err, errlen, "bad prefix length in %.*s (0 to %u)", (int)len, p, max);
                return -1;
            }
            c.bits = (unsigned)bits + (128 - max);
        }
        out->v[out->n++] = c;
        p += len;
    }
    return 0;
}

static bool in_cidr(const tly_cidr_t *c, const uint8_t a[16])
{
    unsigned full = c->bits / 8, rest = c->bits % 8;
    if (memcmp(c->addr, a, full) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (c->addr[full] & mask) == (a[full] & mask);
}

static bool trusted(const tly_proxies_t *px, const uint8_t a[16])
{
    for (size_t i = 0; i < px->n; i++)
        if (in_cidr(&px->v[i], a))
            return true;
    return false;
}

bool tly_proxies_client(const tly_proxies_t *px, const char *peer, tly_str_t xff, char *out, size_t cap)
{
    uint8_t a[16];
    if (px->n == 0 || xff.ptr == NULL || !parse_addr(peer, strlen(peer), a) || !trusted(px, a))
        return false;
    /* From the right, as nginx's real_ip_recursive: each hop appends the address it got
     * the request from, so the rightmost address that is not a trusted proxy is the
     * client; anything left of it was written by the client and proves nothing. */
    size_t end = xff.len;
    const char *pick = NULL;
    size_t pick_len = 0;
    while (end > 0) {
        size_t start = end;
        while (start > 0 && xff.ptr[start - 1] != ',')
            start--;
        size_t s = start, e = end;
        while (s < e && (xff.ptr[s] == ' ' || xff.ptr[s] == '\t'))
            s++;
        while (e > s && (xff.ptr[e - 1] == ' ' || xff.ptr[e - 1] == '\t'))
            e--;
        if (!parse_addr(xff.ptr + s, e - s, a))
            break; /* not an address: what we have so far is all we believe */
        pick = xff.ptr + s;
        pick_len = e - s;
        if (!trusted(px, a))
            break;
        end = start > 0 ? start - 1 : 0;
    }
    if (pick == NULL || pick_len >= cap)
        return false;
    memcpy(out, pick, pick_len);
    out[pick_len] = '\0';
    return true;
}

bool tly_cidrs_contain(const tly_proxies_t *set, const char *addr)
{
    uint8_t a[16];
    return parse_addr(addr, strlen(addr), a) && trusted(set, a);
}

/* Ranges no outbound request goes to unless allowed: IANA's special-purpose registries,
 * less the ones that are globally reachable. */
static const char NOT_PUBLIC[] = "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, "
                                 "192.0.0.0/24, 192.0.2.0/24, 192.88.99.0/24, 192.168.0.0/16, 198.18.0.0/15, "
                                 "198.51.100.0/24, 203.0.113.0/24, 224.0.0.0/4, 240.0.0.0/4, "
                                 "::/128, ::1/128, 64:ff9b::/96, 64:ff9b:1::/48, 100::/64, 2001:db8::/32, "
                                 "2002::/16, fc00::/7, fe80::/10, fec0::/10, ff00::/8";

bool tly_addr_public(const char *addr)
{
    static tly_proxies_t blocked;
    static int parsed; /* 0 not yet, 1 ok (written once, before any use; loop thread in practice) */
    if (!parsed) {
        char err[128];
        if (tly_proxies_parse(NOT_PUBLIC, &blocked, err, sizeof(err)) != 0)
            return false;
        parsed = 1;
    }
    uint8_t a[16];
    return parse_addr(addr, strlen(addr), a) && !trusted(&blocked, a);
}