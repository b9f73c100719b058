/*
 * core: the polling domain, pure C with no I/O. Poll rules and validation, ballot
 * validation per type, counting and results rendering, visibility, and the in-memory
 * state of every poll (options, counters, the per-voter dedup map, the receipt map).
 *
 * Threads: a tly_registry_t and everything reachable from it belongs to the one
 * event-loop thread that created it; nothing here locks. The store's writer thread
 * never touches these objects (it gets copies in tly_store_op_t).
 *
 * JSON: values are jansson json_t; functions that take json_t never steal references.
 */
#ifndef TALLY_CORE_H
#define TALLY_CORE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uthash.h>

#define TLY_MAX_OPTIONS 100
#define TLY_MIN_OPTIONS 2
#define TLY_TITLE_MAX 300      /* code points */
#define TLY_DESCRIPTION_MAX 5000
#define TLY_OPTION_TEXT_MAX 200
#define TLY_VOTER_ID_MAX 128   /* bytes; longer `sub` claims are rejected */
#define TLY_IDEM_KEY_MAX 255
#define TLY_POLL_ID_LEN 16     /* 12 random bytes, base64url */
#define TLY_OPTION_ID_LEN 8    /* 6 random bytes, base64url */
#define TLY_VOTE_ID_LEN 18     /* "v_" + 12 random bytes base64url */
#define TLY_RECEIPT_LEN 22     /* 16 random bytes base64url */
#define TLY_MAX_SCORE_LIMIT 100

typedef enum { TLY_TYPE_SINGLE, TLY_TYPE_MULTIPLE, TLY_TYPE_APPROVAL, TLY_TYPE_RANKED, TLY_TYPE_SCORE } tly_poll_type_t;
typedef enum { TLY_STATUS_DRAFT, TLY_STATUS_ACTIVE, TLY_STATUS_CLOSED } tly_poll_status_t;
typedef enum { TLY_VIS_ALWAYS, TLY_VIS_AFTER_VOTE, TLY_VIS_AFTER_CLOSE, TLY_VIS_OWNER_ONLY } tly_visibility_t;

const char *tly_poll_type_name(tly_poll_type_t t);
const char *tly_poll_status_name(tly_poll_status_t s);
const char *tly_visibility_name(tly_visibility_t v);

typedef struct {
    char option_id[TLY_OPTION_ID_LEN + 1];
    char *text;
    int display_order;
    uint64_t votes; /* committed ballots that chose it (ranked: ranked it first) */
} tly_option_t;

typedef struct {
    bool show_results_during_voting;
    tly_visibility_t results_visibility;
    bool allow_anonymous;
    bool allow_vote_change;
    int min_choices;
    int max_choices;
    int max_score; /* score polls only; 0 otherwise */
} tly_settings_t;

/*
 * A voter's ballot in a poll. `choices` holds option indexes (into poll->options):
 * single/multiple/approval: the chosen options in ascending index order; ranked: in rank
 * order; score: every scored option, with `scores[i]` the score of choices[i].
 */
typedef struct tly_ballot {
    uint8_t nchoices;
    uint8_t choices[TLY_MAX_OPTIONS];
    uint8_t scores[TLY_MAX_OPTIONS];
} tly_ballot_t;

typedef enum { TLY_VOTE_PENDING, TLY_VOTE_COMMITTED } tly_vote_state_t;

/* One voter's recorded ballot; owned by its poll. Allocated with the exact size of its
 * choices (see tly_vote_new). */
typedef struct tly_vote {
    UT_hash_handle hh;         /* poll->votes, keyed by voter_id */
    UT_hash_handle hh_receipt; /* registry->receipts, keyed by receipt */
    struct tly_poll *poll;
    char *voter_id;
    char *idem_key;            /* NULL when none */
    uint8_t body_hash[16];     /* hash of the request body, for Idempotency-Key replay */
    char vote_id[TLY_VOTE_ID_LEN + 1];
    char receipt[TLY_RECEIPT_LEN + 1];
    int64_t recorded_at;       /* ms since epoch */
    uint8_t state;             /* tly_vote_state_t */
    uint8_t nchoices;
    uint8_t data[];            /* nchoices option indexes, then (score polls) nchoices scores */
} tly_vote_t;

typedef struct tly_poll {
    UT_hash_handle hh; /* registry->polls, keyed by poll_id */
    char poll_id[TLY_POLL_ID_LEN + 1];
    char *owner_id;
    char *title;
    char *description; /* NULL when none */
    tly_poll_type_t type;
    tly_poll_status_t status; /* as stored; see tly_poll_effective_status */
    int64_t created_at, updated_at;
    int64_t start_time, end_time; /* ms; 0 when unset */
    tly_settings_t settings;
    size_t noptions;
    tly_option_t *options; /* sorted by display_order */
    char *idem_key;        /* Idempotency-Key of the create request, NULL when none */
    uint8_t body_hash[16];
    uint64_t total_votes;  /* committed ballots */
    uint64_t pending_votes;/* ballots in the writer queue */
    tly_vote_t *votes;     /* uthash by voter_id: pending and committed */
    /* rendered results, rebuilt lazily when dirty */
    char *results_json;
    size_t results_len;
    bool results_dirty;
    int64_t as_of;         /* time of the last commit that changed counts (or created_at) */
    uint64_t seq;          /* grows with every committed change to counts */
    struct tly_poll *owner_next; /* list of the owner's polls, newest first (registry) */
    /* Added by core (zero-initialised fields are valid, so a calloc'd poll still works): */
    uint64_t *score_sum;   /* score polls: 2 * noptions counters, [i] the sum of option i's
                              scores, [noptions + i] the ballots that scored option i (0
                              included). NULL: recomputed from the ballots when rendering. */
    int results_status;    /* effective status results_json was rendered with */
} tly_poll_t;

typedef struct tly_registry tly_registry_t;

/* ---- registry: every poll and vote in memory ---- */

/* Creates an empty registry. NULL on allocation failure. */
tly_registry_t *tly_registry_new(void);
void tly_registry_free(tly_registry_t *r);
tly_poll_t *tly_registry_find_poll(tly_registry_t *r, const char *poll_id);
/* Takes ownership of p (which must have a unique poll_id). */
void tly_registry_add_poll(tly_registry_t *r, tly_poll_t *p);
/* Removes and frees p with all its votes (and their receipts). */
void tly_registry_remove_poll(tly_registry_t *r, tly_poll_t *p);
tly_vote_t *tly_registry_find_receipt(tly_registry_t *r, const char *receipt);
/* Polls of `owner_id`, newest first (created_at desc, then poll_id desc). Fills up to
 * `max` pointers into out, starting after the poll named by `after_poll_id` (NULL: from
 * the newest). Returns the count; *more is set when further polls follow. */
size_t tly_registry_list_owner(tly_registry_t *r, const char *owner_id, const char *after_poll_id,
                               tly_poll_t **out, size_t max, bool *more);

/* ---- polls ---- */

/*
 * Builds a poll from a create-request body. Validates every field (types, limits of
 * API.md, UTF-8 as code points, defaults per type) and on failure returns NULL with
 * *err_field set to the offending field ("title", "options[2].text", "settings.max_choices",
 * "end_time", ...) and *err_msg to a human sentence (both static strings or written
 * into the caller's err_buf of err_buf_len bytes). Generates poll_id and option ids.
 * The caller owns the result (tly_poll_free) until it adds it to a registry.
 * NULL with *err_field == NULL and *err_msg == NULL means out of memory (503), not 400.
 */
tly_poll_t *tly_poll_from_json(json_t *body, const char *owner_id, int64_t now, const char **err_field,
                               const char **err_msg, char *err_buf, size_t err_buf_len);
/*
 * Applies a PATCH body to p (title, description, status, start_time, end_time, settings,
 * options). Validates like tly_poll_from_json; returns 0, TLY_EINVAL with *err_field
 * and *err_msg set (400), TLY_ESTATE for a forbidden status transition (409
 * INVALID_STATUS_TRANSITION; allowed: draft->active, draft->closed, active->closed), or
 * TLY_EEXIST when options would change but votes exist (409 POLL_HAS_VOTES), or
 * TLY_ENOMEM. p is unchanged unless 0 is returned. Marks the results dirty and sets
 * updated_at = now. `type` may be repeated but not changed; new options get new ids.
 */
int tly_poll_patch(tly_poll_t *p, json_t *body, int64_t now, const char **err_field, const char **err_msg,
                   char *err_buf, size_t err_buf_len);
void tly_poll_free(tly_poll_t *p);
/* The status a reader sees at `now`: active polls whose end_time has passed are closed. */
tly_poll_status_t tly_poll_effective_status(const tly_poll_t *p, int64_t now);
/* Whether a ballot may be cast at `now` (active, start_time reached, end_time not reached). */
bool tly_poll_accepts_votes(const tly_poll_t *p, int64_t now);
/* The poll object of API.md as JSON (new reference), status effective at `now`. */
json_t *tly_poll_to_json(const tly_poll_t *p, int64_t now);
/* Index of the option with this id, or -1. */
int tly_poll_option_index(const tly_poll_t *p, const char *option_id);

/* ---- ballots ---- */

typedef enum {
    TLY_BALLOT_OK = 0,
    TLY_BALLOT_INVALID,        /* 400 VALIDATION_ERROR (wrong shape/count/duplicate/range) */
    TLY_BALLOT_UNKNOWN_OPTION, /* 400 INVALID_OPTION */
} tly_ballot_result_t;

/*
 * Parses and validates a vote body against the poll's type and settings:
 * single: {"option_id": id} (or "option_ids" with exactly one id); multiple/approval:
 * {"option_ids": [...]} within min..max choices, no duplicates; ranked: {"ranking": [...]},
 * 1..max_choices distinct ids; score: {"scores": {id: 0..max_score}}. `client_meta` is
 * allowed and ignored here; other unknown fields are ignored. On error *err_field and
 * *err_msg say what is wrong (static strings).
 */
tly_ballot_result_t tly_ballot_parse(const tly_poll_t *p, json_t *body, tly_ballot_t *out, const char **err_field,
                                     const char **err_msg);
/* Ballot as JSON in the form it was cast ({"option_ids":[...]} / {"ranking":[...]} /
 * {"scores":{...}}), with option ids. New reference. */
json_t *tly_ballot_to_json(const tly_poll_t *p, const tly_vote_t *v);
/* The option ids of a vote as a JSON array (single/multiple/approval: chosen; ranked: in
 * order; score: options scored above 0). New reference. */
json_t *tly_vote_option_ids(const tly_poll_t *p, const tly_vote_t *v);

/* ---- votes ---- */

/* Allocates a vote for ballot b (state PENDING), copying voter_id and idem_key (may be
 * NULL). Generates vote_id and receipt unless given (non-NULL, from the store on load).
 * NULL on allocation failure. */
tly_vote_t *tly_vote_new(const tly_ballot_t *b, const char *voter_id, const char *idem_key, const char *vote_id,
                         const char *receipt, int64_t recorded_at);
void tly_vote_free(tly_vote_t *v);
tly_vote_t *tly_poll_find_vote(tly_poll_t *p, const char *voter_id);
/* Adds v to p's dedup map and the registry's receipt map (p must not already have a
 * vote from v->voter_id). Counts are not touched until tly_poll_commit_vote. */
void tly_poll_add_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v);
/* Marks v committed and counts it (options' votes, total_votes, seq, as_of = now,
 * results dirty). Committing an already committed vote does nothing. pending_votes is
 * the caller's to maintain. */
void tly_poll_commit_vote(tly_poll_t *p, tly_vote_t *v, int64_t now);
/* Removes a pending vote whose commit failed (p->votes and receipts) and frees it. */
void tly_poll_drop_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v);
/* Retracts v (DELETE votes/me; a changed vote is retract + add + commit): uncounts it
 * when committed (total_votes, options, seq, as_of = now, results dirty), removes it
 * from p->votes and the receipts and frees it. r may be NULL for a poll outside one. */
void tly_poll_retract_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v, int64_t now);

/* ---- results ---- */

/*
 * Percentages with one decimal: pct[i] = 100 * votes[i] / total, rounded to one decimal.
 * When `largest_remainder` is set (single-choice polls, where the counts sum to total)
 * the tenths are apportioned by the largest-remainder method so they sum to exactly
 * 100.0 (ties to the lower index); otherwise each is rounded half up independently.
 * total == 0 gives all zeros. pct is in tenths of a percent (e.g. 333 = 33.3%).
 */
void tly_percentages(const uint64_t *votes, size_t n, uint64_t total, bool largest_remainder, int *pct_tenths);
/* The results object of API.md for p at `now` (as a compact JSON string cached in p and
 * rebuilt when dirty). The returned pointer is owned by p and valid until the next
 * change; NULL on allocation failure. */
const char *tly_results_render(tly_poll_t *p, int64_t now, size_t *len);

/* ---- visibility ---- */

/* Whether a caller may see p's counts at `now`: caller_id NULL for an anonymous caller;
 * has_voted whether the caller has a committed or pending ballot in p. */
bool tly_results_visible(const tly_poll_t *p, const char *caller_id, bool has_voted, int64_t now);

#endif
