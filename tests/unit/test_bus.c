/*
 * test_bus.c: the Redis bus. What a user would notice: votes fan out to every instance,
 * shared counters and scripts answer, and when Redis goes away callers get an error
 * at once (never a hang) and everything works again when it comes back.
 *
 * Needs a Redis: TALLY_TEST_REDIS=redis://127.0.0.1:PORT (keys are prefixed with a
 * random id, so any scratch Redis will do). Without it the suite is skipped. The
 * reconnect tests start and kill their own redis-server on a free loopback port.
 */
#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "base/base.h"
#include "bus/bus.h"
#include "http/http.h"

ReportHook(PRE_ALL)(struct criterion_test_set *set)
{
    (void)set;
    if (getenv("TALLY_TEST_REDIS") == NULL)
        printf("test_bus: skipped (set TALLY_TEST_REDIS=redis://127.0.0.1:PORT to run it)\n");
}

/* Without a Redis to talk to a test is skipped (reported as skipped, not passed). */
#define NEED_REDIS()                                                                                                   \
    do {                                                                                                               \
        if (getenv("TALLY_TEST_REDIS") == NULL)                                                                        \
            cr_skip_test("TALLY_TEST_REDIS is not set");                                                               \
    } while (0)

static tly_loop_t *loop;
static pid_t server_pid = -1;

static void setup(void)
{
    loop = tly_loop_new();
    cr_assert_not_null(loop);
}

static void teardown(void)
{
    if (server_pid > 0) {
        kill(server_pid, SIGKILL);
        waitpid(server_pid, NULL, 0);
        server_pid = -1;
    }
    tly_loop_free(loop);
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Runs the loop until cond holds or ms pass; evaluates to cond. */
#define RUN_UNTIL(cond, ms)                                                                                            \
    ({                                                                                                                 \
        uint64_t until_ = mono_ms() + (ms);                                                                            \
        while (!(cond) && mono_ms() < until_)                                                                          \
            tly_loop_run_once(loop, 10);                                                                               \
        (cond);                                                                                                        \
    })

/* ---- one bus's observations ---- */

typedef struct {
    tly_bus_t *bus;
    int ups, downs;
    int messages;
    char last_channel[128];
    char last_payload[256];
    size_t last_len;
} watch_t;

static void on_message(void *arg, const char *channel, const char *payload, size_t len)
{
    watch_t *w = arg;
    w->messages++;
    snprintf(w->last_channel, sizeof(w->last_channel), "%s", channel);
    w->last_len = len < sizeof(w->last_payload) ? len : sizeof(w->last_payload) - 1;
    memcpy(w->last_payload, payload, w->last_len);
    w->last_payload[w->last_len] = '\0';
}

static void on_state(void *arg, bool up)
{
    watch_t *w = arg;
    if (up)
        w->ups++;
    else
        w->downs++;
}

static void open_bus(watch_t *w, const char *url)
{
    memset(w, 0, sizeof(*w));
    tly_bus_conf_t conf = {.loop = loop,
                           .url = url,
                           .instance_id = "test",
                           .on_message = on_message,
                           .on_state = on_state,
                           .arg = w};
    cr_assert_eq(tly_bus_open(&conf, &w->bus), 0);
}

/* ---- one command's reply, copied out of the callback ---- */

typedef struct {
    int calls;
    tly_bus_reply_type_t type;
    long long integer;
    char str[256];
    size_t len, n;
    tly_bus_reply_type_t el_type[8];
    char el[8][64];
    long long el_int[8];
} result_t;

static void on_reply(void *arg, const tly_bus_reply_t *r)
{
    result_t *res = arg;
    res->calls++;
    res->type = r->type;
    res->integer = r->integer;
    res->len = r->len;
    if (r->str != NULL)
        snprintf(res->str, sizeof(res->str), "%.*s", (int)r->len, r->str);
    res->n = r->nelements;
    for (size_t i = 0; i < r->nelements && i < 8; i++) {
        res->el_type[i] = r->elements[i].type;
        res->el_int[i] = r->elements[i].integer;
        if (r->elements[i].str != NULL)
            snprintf(res->el[i], sizeof(res->el[i]), "%.*s", (int)r->elements[i].len, r->elements[i].str);
    }
}

static void prefix(char *out)
{
    tly_random_id(out, "tlytest:", 9);
}

/* ---- a redis-server of the test's own ---- */

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    cr_assert(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
    cr_assert(getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
    close(fd);
    return ntohs(sa.sin_port);
}

static bool port_open(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bool ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    close(fd);
    return ok;
}

static void start_redis(int port)
{
    char p[16];
    snprintf(p, sizeof(p), "%d", port);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the test */
        int null = open("/dev/null", O_WRONLY);
        dup2(null, STDOUT_FILENO);
        execl("/usr/bin/redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
              "--appendonly", "no", "--daemonize", "no", (char *)NULL);
        _exit(127);
    }
    server_pid = pid;
    uint64_t until = mono_ms() + 5000;
    while (!port_open(port) && mono_ms() < until)
        usleep(20 * 1000);
    cr_assert(port_open(port), "redis-server did not start on port %d", port);
}

static void stop_redis(void)
{
    kill(server_pid, SIGKILL);
    waitpid(server_pid, NULL, 0);
    server_pid = -1;
}

TestSuite(bus, .init = setup, .fini = teardown, .timeout = 60);

Test(bus, malformed_url_is_refused)
{
    tly_bus_t *bus = NULL;
    const char *bad[] = {"", "http://127.0.0.1:6379", "redis://", "redis://:6379", "redis://h:0", "redis://h:99999",
                         "redis://h:6379/x", "redis://user:pw@h:6379", "redis://h:6379?x=1", "redis://[::1"};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad); i++) {
        tly_bus_conf_t conf = {.loop = loop, .url = bad[i]};
        cr_expect_eq(tly_bus_open(&conf, &bus), TLY_EINVAL, "%s", bad[i]);
    }
}

Test(bus, publish_reaches_another_instance)
{
    NEED_REDIS();
    const char *url = getenv("TALLY_TEST_REDIS");
    watch_t a, b;
    open_bus(&a, url);
    open_bus(&b, url);
    char ch[64];
    prefix(ch);
    cr_assert_eq(tly_bus_subscribe(b.bus, ch), 0);
    cr_assert_eq(tly_bus_subscribe(b.bus, ch), 0); /* twice is once */
    cr_assert(RUN_UNTIL(tly_bus_up(a.bus) && tly_bus_up(b.bus), 5000));
    cr_expect_eq(a.ups, 1);
    /* the SUBSCRIBE may still be on its way: publish until it lands */
    const char payload[] = "{\"poll\":1}\0tail";
    uint64_t until = mono_ms() + 5000;
    while (b.messages == 0 && mono_ms() < until) {
        tly_bus_publish(a.bus, ch, payload, sizeof(payload) - 1);
        RUN_UNTIL(b.messages > 0, 50);
    }
    cr_assert_gt(b.messages, 0);
    cr_expect_str_eq(b.last_channel, ch);
    cr_expect_eq(b.last_len, sizeof(payload) - 1); /* binary-safe */
    cr_expect_str_eq(b.last_payload, "{\"poll\":1}");
    tly_bus_stats_t st;
    tly_bus_stats(a.bus, &st);
    cr_expect_geq(st.published, 1);
    cr_expect_eq(st.dropped, 0);
    cr_expect(st.up);
    tly_bus_close(a.bus);
    tly_bus_close(b.bus);
}

Test(bus, commands_answer)
{
    NEED_REDIS();
    watch_t a;
    open_bus(&a, getenv("TALLY_TEST_REDIS"));
    cr_assert(RUN_UNTIL(tly_bus_up(a.bus), 5000));
    char k[64], key[96];
    prefix(k);

    result_t set = {0}, get = {0}, incr = {0}, miss = {0}, bad = {0}, push = {0}, range = {0}, bin = {0};
    snprintf(key, sizeof(key), "%s:s", k);
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &set, "SET %s %s EX 60", key, "hello"), 0);
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &get, "GET %s", key), 0);
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &bad, "INCR %s", key), 0);
    cr_expect_eq(set.calls + get.calls, 0, "no callback inside the call");
    char ikey[96];
    snprintf(ikey, sizeof(ikey), "%s:n", k);
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &incr, "INCRBY %s %d", ikey, 41), 0);
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &miss, "GET %s:none", k), 0);
    char lkey[96];
    snprintf(lkey, sizeof(lkey), "%s:l", k);
    const char *argv[] = {"RPUSH", lkey, "a", "b\0c", "7"};
    const size_t argvlen[] = {5, strlen(lkey), 1, 3, 1};
    cr_assert_eq(tly_bus_command_argv(a.bus, on_reply, &push, 5, argv, argvlen), 0);
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &range, "LRANGE %s 0 -1", lkey), 0);
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &bin, "LINDEX %b 1", lkey, strlen(lkey)), 0);
    cr_assert(RUN_UNTIL(bin.calls == 1, 5000));

    cr_expect_eq(set.calls, 1);
    cr_expect_eq(set.type, TLY_BUS_STATUS);
    cr_expect_str_eq(set.str, "OK");
    cr_expect_eq(get.type, TLY_BUS_STRING);
    cr_expect_str_eq(get.str, "hello");
    cr_expect_eq(bad.type, TLY_BUS_ERROR);
    cr_expect(strncmp(bad.str, "ERR", 3) == 0, "%s", bad.str);
    cr_expect_eq(incr.type, TLY_BUS_INT);
    cr_expect_eq(incr.integer, 41);
    cr_expect_eq(miss.type, TLY_BUS_NIL);
    cr_expect_eq(push.type, TLY_BUS_INT);
    cr_expect_eq(push.integer, 3);
    cr_expect_eq(range.type, TLY_BUS_ARRAY);
    cr_assert_eq(range.n, 3);
    cr_expect_str_eq(range.el[0], "a");
    cr_expect_eq(range.el_type[1], TLY_BUS_STRING);
    cr_expect_eq(bin.len, 3);
    cr_expect_str_eq(range.el[2], "7");

    tly_bus_stats_t st;
    tly_bus_stats(a.bus, &st);
    cr_expect_eq(st.commands, 8);
    cr_expect_eq(st.replies, 8);
    cr_expect_eq(st.errors, 1);
    tly_bus_command(a.bus, NULL, NULL, "DEL %s %s %s", key, ikey, lkey);
    RUN_UNTIL(false, 50);
    tly_bus_close(a.bus);
}

Test(bus, script_runs_and_survives_script_flush)
{
    NEED_REDIS();
    watch_t a;
    open_bus(&a, getenv("TALLY_TEST_REDIS"));
    /* registered before the connection is up: loaded by the handshake */
    tly_bus_script_t *s = tly_bus_script_new(a.bus, "local n = redis.call('INCRBY', KEYS[1], ARGV[1]) "
                                                    "redis.call('EXPIRE', KEYS[1], 60) "
                                                    "return {n, ARGV[2]}");
    cr_assert_not_null(s);
    cr_assert(RUN_UNTIL(tly_bus_up(a.bus), 5000));
    char k[64];
    prefix(k);
    const char *argv[] = {k, "5", "tag"};

    result_t r1 = {0};
    cr_assert_eq(tly_bus_script(a.bus, s, on_reply, &r1, 1, 3, argv, NULL), 0);
    cr_assert(RUN_UNTIL(r1.calls == 1, 5000));
    cr_assert_eq(r1.type, TLY_BUS_ARRAY, "%s", r1.str);
    cr_assert_eq(r1.n, 2);
    cr_expect_eq(r1.el_type[0], TLY_BUS_INT);
    cr_expect_eq(r1.el_int[0], 5);
    cr_expect_str_eq(r1.el[1], "tag");

    /* the server forgets every script: EVALSHA gets NOSCRIPT, the bus loads and retries */
    result_t flush = {0}, r2 = {0};
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &flush, "SCRIPT FLUSH"), 0);
    cr_assert_eq(tly_bus_script(a.bus, s, on_reply, &r2, 1, 3, argv, NULL), 0);
    cr_assert(RUN_UNTIL(r2.calls == 1, 5000));
    cr_expect_eq(flush.type, TLY_BUS_STATUS);
    cr_assert_eq(r2.type, TLY_BUS_ARRAY, "%s", r2.str);
    cr_expect_eq(r2.el_int[0], 10);
    RUN_UNTIL(false, 50);
    cr_expect_eq(r2.calls, 1, "exactly one reply");

    result_t bad = {0};
    cr_expect_eq(tly_bus_script(a.bus, s, on_reply, &bad, 4, 3, argv, NULL), TLY_EINVAL);
    tly_bus_command(a.bus, NULL, NULL, "DEL %s", k);
    RUN_UNTIL(false, 50);
    tly_bus_close(a.bus);
}

Test(bus, down_gives_error_replies_not_waits)
{
    NEED_REDIS();
    char url[64];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", free_port()); /* nothing listens */
    watch_t a;
    open_bus(&a, url); /* opens although Redis is unreachable */
    cr_expect(!tly_bus_up(a.bus));
    result_t r = {0};
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &r, "GET %s", "x"), 0);
    cr_expect_eq(r.calls, 0, "never inside the call");
    tly_bus_publish(a.bus, "ch", "x", 1);
    cr_assert(RUN_UNTIL(r.calls == 1, 1000));
    cr_expect_eq(r.type, TLY_BUS_ERROR);
    cr_expect_str_eq(r.str, "bus down");
    RUN_UNTIL(false, 300); /* a few reconnect attempts */
    cr_expect_eq(r.calls, 1);
    cr_expect_eq(a.ups + a.downs, 0, "no transition: it never came up");
    tly_bus_stats_t st;
    tly_bus_stats(a.bus, &st);
    cr_expect_eq(st.dropped, 1);
    cr_expect_eq(st.errors, 1);
    cr_expect(!st.up);
    /* close while a "bus down" reply is still queued: delivered before close returns */
    result_t q = {0};
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &q, "PING"), 0);
    tly_bus_close(a.bus);
    cr_expect_eq(q.calls, 1);
    cr_expect_eq(q.type, TLY_BUS_ERROR);
}

Test(bus, reconnects_after_redis_restarts)
{
    NEED_REDIS();
    int port = free_port();
    start_redis(port);
    char url[64];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d/2", port);
    watch_t a;
    open_bus(&a, url);
    cr_assert_eq(tly_bus_subscribe(a.bus, "tlytest:events"), 0);
    tly_bus_script_t *s = tly_bus_script_new(a.bus, "return redis.call('INCR', KEYS[1])");
    cr_assert(RUN_UNTIL(tly_bus_up(a.bus), 5000));
    cr_expect_eq(a.ups, 1);

    /* a command in flight when Redis dies (BLPOP waits forever) */
    result_t blocked = {0};
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &blocked, "BLPOP %s 0", "tlytest:never"), 0);
    RUN_UNTIL(false, 100);
    cr_expect_eq(blocked.calls, 0);

    stop_redis();
    cr_assert(RUN_UNTIL(a.downs == 1, 5000));
    cr_expect(!tly_bus_up(a.bus));
    cr_expect_eq(blocked.calls, 1);
    cr_expect_eq(blocked.type, TLY_BUS_ERROR);
    cr_expect_str_eq(blocked.str, "bus lost");
    result_t down = {0};
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &down, "PING"), 0);
    cr_assert(RUN_UNTIL(down.calls == 1, 1000));
    cr_expect_str_eq(down.str, "bus down");
    RUN_UNTIL(false, 500); /* a few refused attempts */

    start_redis(port); /* same port, empty: no scripts, no subscriptions */
    cr_assert(RUN_UNTIL(tly_bus_up(a.bus), 5000));
    cr_expect_eq(a.ups, 2);
    cr_expect_eq(blocked.calls, 1, "exactly once");
    uint64_t until = mono_ms() + 5000;
    while (a.messages == 0 && mono_ms() < until) {
        tly_bus_publish(a.bus, "tlytest:events", "again", 5);
        RUN_UNTIL(a.messages > 0, 50);
    }
    cr_expect_gt(a.messages, 0, "subscribed again after reconnect");
    cr_expect_str_eq(a.last_payload, "again");

    result_t sr = {0}, db = {0};
    const char *keys[] = {"tlytest:n"};
    cr_assert_eq(tly_bus_script(a.bus, s, on_reply, &sr, 1, 1, keys, NULL), 0);
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &db, "CLIENT INFO"), 0);
    cr_assert(RUN_UNTIL(sr.calls == 1 && db.calls == 1, 5000));
    cr_expect_eq(sr.type, TLY_BUS_INT, "%s", sr.str);
    cr_expect_eq(sr.integer, 1);
    cr_expect(strstr(db.str, " db=2 ") != NULL, "%s", db.str);
    cr_expect(strstr(db.str, "name=tally:test:cmd") != NULL, "%s", db.str);

    tly_bus_stats_t st;
    tly_bus_stats(a.bus, &st);
    cr_expect_eq(st.reconnects, 1);
    cr_expect(st.up);

    /* close with a command in flight: its error comes before close returns */
    result_t pending = {0};
    cr_assert_eq(tly_bus_command(a.bus, on_reply, &pending, "BLPOP %s 0", "tlytest:never"), 0);
    RUN_UNTIL(false, 50);
    tly_bus_close(a.bus);
    cr_expect_eq(pending.calls, 1);
    cr_expect_str_eq(pending.str, "bus closed");
}
