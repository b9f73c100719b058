/*
 * bus: what joins tally instances that share a store: Redis pub/sub for fan-out, and
 * Redis commands and Lua scripts for shared counters, dedup sets and rate limits.
 *
 * A tly_bus_t keeps its own connections to one Redis (one for commands and publishes,
 * one subscriber) on the caller's loop, reconnecting by itself with backoff (100 ms
 * doubling to 2 s) whenever a connection is refused or lost, and subscribing again to
 * every channel after a reconnect. The bus is "up" when every connection has answered
 * its handshake; commands need it up, and otherwise get an error reply, never a wait:
 * callers fall back (votes go to the store directly, live updates poll the store).
 *
 * Threads: a tly_bus_t, and every callback it makes, belong to the thread that runs its
 * loop. No function here may be called from another thread.
 */
#ifndef TALLY_BUS_H
#define TALLY_BUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "http/http.h"

typedef struct tly_bus tly_bus_t;
typedef struct tly_bus_script tly_bus_script_t;

/* A reply, as Redis (RESP2) sent it. Strings point into the bus's memory, are
 * NUL-terminated after len bytes (binary-safe by len) and, like the whole tree, are
 * valid only during the callback that receives the reply. */
typedef enum {
    TLY_BUS_NIL,
    TLY_BUS_INT,    /* integer */
    TLY_BUS_STRING, /* str, len: a bulk string */
    TLY_BUS_STATUS, /* str, len: "OK", "PONG", ... */
    TLY_BUS_ERROR,  /* str, len: Redis's error ("ERR ...", "NOSCRIPT ...") or the bus's own */
    TLY_BUS_ARRAY   /* elements[0 .. nelements) */
} tly_bus_reply_type_t;

typedef struct tly_bus_reply {
    tly_bus_reply_type_t type;
    long long integer;
    const char *str;
    size_t len;
    const struct tly_bus_reply *elements;
    size_t nelements;
} tly_bus_reply_t;

/* The bus's own error replies (type TLY_BUS_ERROR, str one of these):
 *   "bus down"       not sent: the bus was down (or over its in-flight bound, see below)
 *   "bus lost"       sent, but the connection dropped before the reply came
 *   "bus closed"     sent, but tly_bus_close was called before the reply came
 *   "out of memory"  the reply came but could not be handed over */
typedef void (*tly_bus_cb)(void *arg, const tly_bus_reply_t *reply);

typedef struct {
    tly_loop_t *loop;
    const char *url;         /* redis://host:port[/db]; IPv6 hosts in brackets */
    const char *instance_id; /* names the connections (CLIENT SETNAME tally:<id>:cmd); may be NULL */
    /* A message on a subscribed channel. channel is NUL-terminated; payload is len
     * bytes (followed by a NUL). Both valid during the call only. Optional. */
    void (*on_message)(void *arg, const char *channel, const char *payload, size_t len);
    /* The bus went up (true) or down (false). Called on transitions only: a bus that
     * starts with Redis unreachable is down without a call. Optional. */
    void (*on_state)(void *arg, bool up);
    void *arg;
} tly_bus_conf_t;

/* Commands and publishes sent and not yet answered are bounded: beyond this, commands
 * get "bus down" and publishes are dropped, as if Redis were unreachable. */
#define TLY_BUS_MAX_INFLIGHT 65536
#define TLY_BUS_MAX_CHANNELS 1024
#define TLY_BUS_MAX_SCRIPTS 64

/* Starts a bus on conf->loop and returns it in *out; conf and its strings are copied.
 * Connecting happens on the loop: open succeeds while Redis is unreachable and the bus
 * keeps trying. Returns 0, TLY_EINVAL for a URL that is not redis://host:port[/db]
 * (without credentials), or TLY_ENOMEM. Host names are resolved here, blocking. */
int tly_bus_open(const tly_bus_conf_t *conf, tly_bus_t **out);

/* Whether every connection is established and answered its handshake. */
bool tly_bus_up(tly_bus_t *bus);

/* Subscribes to channel (copied) now if possible and again after every reconnect;
 * messages arrive through conf->on_message. Subscribing twice is a no-op. Returns 0,
 * TLY_EINVAL (empty name), TLY_EFULL (TLY_BUS_MAX_CHANNELS) or TLY_ENOMEM. */
int tly_bus_subscribe(tly_bus_t *bus, const char *channel);

/* PUBLISH, fire and forget: when the bus is down the message is dropped and counted
 * (stats.dropped); subscribers that are down miss it too (pub/sub keeps no history). */
void tly_bus_publish(tly_bus_t *bus, const char *channel, const char *payload, size_t len);

/* Sends a command in hiredis's format ("SET %s %b", key, val, val_len: %s is a C
 * string, %b a pointer and a size_t length, each one argument) and calls cb(arg, reply)
 * exactly once with the reply or one of the bus's errors. cb is never called inside
 * this function: when the bus is down the "bus down" reply comes from the loop soon
 * after (within a few ms). cb may be NULL. Returns 0 (cb will be called), or
 * TLY_EINVAL (the format could not be used) / TLY_ENOMEM / TLY_ESTATE (the bus is
 * closing), and then cb is never called. */
int tly_bus_command(tly_bus_t *bus, tly_bus_cb cb, void *arg, const char *fmt, ...);
/* The same with argc arguments; argvlen may be NULL for NUL-terminated arguments. */
int tly_bus_command_argv(tly_bus_t *bus, tly_bus_cb cb, void *arg, size_t argc, const char *const *argv,
                         const size_t *argvlen);

/* Registers a Lua script (copied), to be run with tly_bus_script. Register at start-up:
 * scripts live until tly_bus_close. Returns NULL when out of memory or at
 * TLY_BUS_MAX_SCRIPTS. */
tly_bus_script_t *tly_bus_script_new(tly_bus_t *bus, const char *lua);

/* Runs a registered script with EVALSHA: argv[0 .. nkeys) are its KEYS and the rest
 * (argc - nkeys) its ARGV; argvlen may be NULL. Scripts are loaded (SCRIPT LOAD) after
 * every connect, and when Redis answers NOSCRIPT (SCRIPT FLUSH, a failover) the script
 * is loaded and run once more, so the caller sees NOSCRIPT only if that fails too.
 * Calls cb like tly_bus_command, and returns the same codes (TLY_EINVAL: nkeys > argc). */
int tly_bus_script(tly_bus_t *bus, tly_bus_script_t *script, tly_bus_cb cb, void *arg, size_t nkeys, size_t argc,
                   const char *const *argv, const size_t *argvlen);

/* Counters since open, for /metrics. */
typedef struct {
    uint64_t commands;   /* commands and scripts sent to Redis */
    uint64_t replies;    /* replies Redis sent to them (error replies included) */
    uint64_t errors;     /* error replies given to callbacks: Redis's and the bus's own */
    uint64_t published;  /* publishes sent */
    uint64_t dropped;    /* publishes dropped (bus down, or the connection lost before Redis answered) */
    uint64_t reconnects; /* times the bus came back up after being down */
    bool up;
} tly_bus_stats_t;
void tly_bus_stats(tly_bus_t *bus, tly_bus_stats_t *out);

/* Closes the connections and frees the bus, its subscriptions and scripts. Every
 * command still waiting gets its error reply ("bus closed", or "bus down" for those
 * not sent) before this returns; commands issued from those callbacks are refused
 * (TLY_ESTATE). Must not be called from inside one of the bus's callbacks (aborts).
 * NULL is a no-op. Call it before tly_loop_free. */
void tly_bus_close(tly_bus_t *bus);

#endif
