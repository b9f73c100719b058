/*
 * core: the polling domain, pure C with no I/O. Poll rules and validation, ballot
 * validation per type, counting (casts, changes, retractions) and results rendering,
 * final results, visibility, and the in-memory state of every poll (options,
 * counters, timelines, votes_last_minute, the per-voter dedup map, the receipt map).
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

#include "base/base.h"

#define TLY_MAX_OPTIONS 100
#define TLY_MIN_OPTIONS 2
#define TLY_TITLE_MAX 300 /* code points */
#define TLY_DESCRIPTION_MAX 5000
#define TLY_OPTION_TEXT_MAX 200
#define TLY_VOTER_ID_MAX 128 /* bytes; longer `sub` claims are rejected */
#define TLY_IDEM_KEY_MAX 255
#define TLY_POLL_ID_LEN 16  /* 12 random bytes, base64url */
#define TLY_OPTION_ID_LEN 8 /* 6 random bytes, base64url */
#define TLY_VOTE_ID_LEN 18  /* "v_" + 12 random bytes base64url */
#define TLY_RECEIPT_LEN 22  /* 16 random bytes base64url */
#define TLY_MAX_SCORE_LIMIT 100

typedef enum { TLY_TYPE_SINGLE, TLY_TYPE_MULTIPLE, TLY_TYPE_APPROVAL, TLY_TYPE_RANKED, TLY_TYPE_SCORE } tly_poll_type_t;
typedef enum { TLY_STATUS_DRAFT, TLY_STATUS_ACTIVE, TLY_STATUS_CLOSED } tly_poll_status_t;
typedef enum { TLY_VIS_ALWAYS, TLY_VIS_AFTER_VOTE, TLY_VIS_AFTER_CLOSE, TLY_VIS_OWNER_ONLY } tly_visibility_t;
/*
 * settings.voter_check: what makes a second ballot a duplicate. "token": the same voter
 * (token `sub`); "ip": the same client address (IPv6 by its /64), whoever the token
 * names; "token+ip": either. A ballot always belongs to one voter (votes/me, change,
 * retract and the store's UNIQUE(poll_id, voter_id) are per voter), so under "ip" a
 * voter still holds at most one ballot too.
 */
typedef enum { TLY_VOTER_CHECK_TOKEN, TLY_VOTER_CHECK_IP, TLY_VOTER_CHECK_TOKEN_IP } tly_voter_check_t;

const char *tly_poll_type_name(tly_poll_type_t t);
const char *tly_poll_status_name(tly_poll_status_t s);
const char *tly_visibility_name(tly_visibility_t v);
/* "token", "ip" or "token+ip". */
const char *tly_voter_check_name(tly_voter_check_t c);
/* Whether ballots of a poll with this setting are checked by client address. */
static inline bool tly_voter_check_ip(tly_voter_check_t c)
{
    return c == TLY_VOTER_CHECK_IP || c == TLY_VOTER_CHECK_TOKEN_IP;
}

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
    int max_score;                 /* score polls only; 0 otherwise */
    tly_voter_check_t voter_check; /* TLY_VOTER_CHECK_TOKEN (zero) by default */
} tly_settings_t;

/* Bytes of the keyed hash of a client address (see tly_poll_set_vote_ip). */
#define TLY_IP_HASH_LEN 16

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
    char *idem_key;         /* NULL when none */
    struct tly_ip_vote *ip; /* its entry in poll->ip_votes, NULL when none (core's) */
    /* The ballot as first cast, kept from the first change of a vote that has an
     * idem_key on; NULL otherwise (core's; see tly_vote_cast_option_ids). */
    struct tly_vote_cast *cast;
    uint8_t body_hash[16]; /* hash of the request body, for Idempotency-Key replay */
    char vote_id[TLY_VOTE_ID_LEN + 1];
    char receipt[TLY_RECEIPT_LEN + 1];
    int64_t recorded_at; /* ms since epoch: when cast, or last changed */
    int64_t store_seq;   /* the store's name for the ballot (tly_ballot_row_t.seq), 0 = none */
    uint32_t ranked_row; /* core's: 1 + its row in poll->ranked, 0 when it has none */
    uint8_t state;       /* tly_vote_state_t */
    uint8_t nchoices;
    uint8_t data[]; /* nchoices option indexes, then (score polls) nchoices scores */
} tly_vote_t;

/*
 * Timelines: per poll and per resolution, the counted ballots per option in tumbling
 * windows aligned to the epoch (a bucket of size S starts at floor(t / S) * S). Core's
 * own state (see timeline.c); zero is an empty timeline. `buckets` is a ring of `cap`
 * buckets, each {int64_t start; uint32_t counts[noptions]}, padded to 8 bytes, sorted by
 * start from `head`; only buckets that ever held a ballot exist.
 */
#define TLY_TIMELINE_RESOLUTIONS 3
typedef struct {
    uint8_t *buckets; /* owned by the poll; NULL until the first counted ballot */
    uint32_t cap, count, head;
    uint32_t noptions; /* the option count the buckets were laid out for */
    int64_t floor;     /* buckets starting before this were dropped (0: none were) */
} tly_timeline_t;

/* votes_last_minute: 60 per-second counters, slot s % 60 counting events of second s. */
typedef struct {
    int64_t second[60];
    uint32_t count[60];
} tly_activity_t;

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
    uint64_t total_votes;   /* committed ballots */
    uint64_t pending_votes; /* ballots in the writer queue */
    tly_vote_t *votes;      /* uthash by voter_id: pending and committed */
    /* rendered results, rebuilt lazily when dirty */
    char *results_json;
    size_t results_len;
    bool results_dirty;
    int64_t as_of;               /* time of the last commit that changed counts (or created_at) */
    uint64_t seq;                /* grows with every committed change to counts */
    uint64_t edits;              /* changes to the poll itself (PATCH, adopt) since the start;
                                    what live streams number a state without counts by */
    struct tly_poll *owner_next; /* list of the owner's polls, newest first (registry) */
    /* Added by core (zero-initialised fields are valid, so a calloc'd poll still works): */
    uint64_t *score_sum; /* score polls: 2 * noptions counters, [i] the sum of option i's
                            scores, [noptions + i] the ballots that scored option i (0
                            included). NULL: recomputed from the ballots when rendering. */
    int results_status;  /* effective status results_json was rendered with */
    /* Added for changes, timelines and final results (zero is valid here too): */
    size_t results_prefix_len; /* results_json without its closing votes_last_minute part */
    uint64_t results_vlm;      /* the votes_last_minute written after that prefix */
    bool results_final;        /* results_json was copied from final_json */
    char *final_json;          /* the frozen final results, NULL until frozen; owned by p */
    /* Set by the API when instances share the store: the final results are the store's
     * (tly_poll_set_final_results), never frozen here on a render; `settling` is the
     * API's mark of a freeze under way. */
    bool final_by_store, settling;
    tly_timeline_t timeline[TLY_TIMELINE_RESOLUTIONS]; /* 10 s, 1 min, 1 h */
    tly_activity_t activity;                           /* ballots cast or changed per second, the last 60 s */
    /* Added for settings.voter_check (NULL is an empty set): the keyed hashes of the
     * client addresses ballots were cast from -> those ballots (pending and committed),
     * uthash by the TLY_IP_HASH_LEN bytes. Core's; see tly_poll_set_vote_ip. */
    struct tly_ip_vote *ip_votes;
    /* Added for ranked polls: the pairwise counts behind the Condorcet winner, kept as
     * ballots are counted, changed and retracted (core_count_vote), so a render reads
     * them in O(noptions^2) instead of walking every ranking. noptions * noptions +
     * noptions counters: [a * n + b] (a != b) the committed ballots ranking both a and
     * b, a first; [n * n + a] those ranking a. NULL until the first ballot is counted
     * (or when it could not be allocated: then the next render builds it from the
     * ballots, and it is kept from there on). */
    uint64_t *ranked_pairs;
    /* The committed rankings in one table, for counting them off the loop thread from a
     * snapshot (core's, see ranked.c); NULL: built from the ballots when next counted. */
    struct core_ranked *ranked;
    uint64_t results_gen;  /* moves on with every change that makes the rendering stale */
    uint64_t results_rgen; /* the results_gen results_json was rendered at */
    uint64_t results_seq;  /* the seq results_json was rendered at */
    bool counting;         /* the API's mark: a tly_results_job_t of p is under way */
    /* Added for join codes: the poll's code while it is open (draft or active), ""
     * when it has none (closed, or not given one yet). Set only through
     * tly_registry_set_code (the registry finds polls by it) or before the poll is
     * added to a registry. */
    char join_code[TLY_JOIN_CODE_LEN + 1];
    UT_hash_handle hh_code; /* registry's: polls by join_code */
} tly_poll_t;

typedef struct tly_registry tly_registry_t;

/* ---- registry: every poll and vote in memory ---- */

/* Creates an empty registry. NULL on allocation failure. */
tly_registry_t *tly_registry_new(void);
void tly_registry_free(tly_registry_t *r);
tly_poll_t *tly_registry_find_poll(tly_registry_t *r, const char *poll_id);
/* How many polls the registry holds. */
size_t tly_registry_count(const tly_registry_t *r);
/* Calls fn for every poll, in no particular order; fn must not add or remove polls. */
void tly_registry_each_poll(tly_registry_t *r, void (*fn)(void *ctx, tly_poll_t *p), void *ctx);
/* Takes ownership of p (which must have a unique poll_id). */
int tly_registry_add_poll(tly_registry_t *r, tly_poll_t *p); /* 0 or TLY_ENOMEM (not added, not taken) */
/* Polls added from now on get final_by_store = on (instances that share a store). */
void tly_registry_set_final_by_store(tly_registry_t *r, bool on);
/* Removes and frees p with all its votes (and their receipts). */
void tly_registry_remove_poll(tly_registry_t *r, tly_poll_t *p);
tly_vote_t *tly_registry_find_receipt(tly_registry_t *r, const char *receipt);
/* The poll holding join code `code` (as tly_join_code_read writes it), or NULL. A poll
 * holds its code from when it is added (or given one) until tly_registry_set_code takes
 * it back or the poll is removed, whatever its effective status: a poll past its
 * end_time keeps its code until it is settled, and no other poll gets it meanwhile. */
tly_poll_t *tly_registry_find_code(tly_registry_t *r, const char *code);
/* Gives p (in r) the join code `code`, or takes its code back (code NULL or ""). 0, or
 * TLY_EEXIST when another poll holds code (p then has none), or TLY_ENOMEM (p has none).
 * tly_registry_add_poll indexes the code a poll comes with the same way: one held by
 * another poll is dropped from the newcomer. */
int tly_registry_set_code(tly_registry_t *r, tly_poll_t *p, const char *code);
/* Polls of `owner_id`, newest first (created_at desc, then poll_id desc). Fills up to
 * `max` pointers into out, starting after the poll named by `after_poll_id` (NULL: from
 * the newest). Returns the count; *more is set when further polls follow. */
size_t tly_registry_list_owner(tly_registry_t *r, const char *owner_id, const char *after_poll_id, tly_poll_t **out,
                               size_t max, bool *more);

/* Makes owner_id p's owner (a device linked to an account hands its polls over): p
 * moves from its old owner's listing to its place in the new one's. p must be in r.
 * 0; TLY_ENOMEM before anything changed (the id could not be copied), or after (the new
 * owner's list entry could not be made: p is the new owner's but missing from listings,
 * as tly_registry_add_poll leaves a poll on the same failure). Loop thread. */
int tly_registry_set_owner(tly_registry_t *r, tly_poll_t *p, const char *owner_id);

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
 * and *err_msg set (400), or, with *err_field and *err_msg set too:
 *   TLY_ESTATE (409 INVALID_STATUS_TRANSITION) for a forbidden status transition
 *     (allowed: draft->active, draft->closed, active->closed), judged on the EFFECTIVE
 *     status at `now`: an active poll whose end_time has passed is closed, so it cannot
 *     be moved to active, nor reopened by a later or null end_time. A closed poll's
 *     end_time and options cannot change at all (sending the current end_time is not a
 *     change); its final results are final. Extending the end_time of a poll still
 *     open stays allowed.
 *   TLY_EEXIST (409 POLL_HAS_VOTES) when options, settings.min_choices,
 *     settings.max_choices, settings.max_score or settings.voter_check would change
 *     while any vote (pending or committed) exists: ballots already cast were validated
 *     (or checked for duplicates) against them, and the address set of voter_check
 *     holds only ballots cast under it. Sending the current value is not a change.
 *     allow_vote_change, results_visibility, show_results_during_voting and
 *     allow_anonymous may change at any time.
 *   TLY_ENOMEM.
 * Settings out of range are a 400 before they are a 409. p is unchanged unless 0 is
 * returned. Marks the results dirty and sets updated_at = now. `type` may be repeated
 * but not changed; new options get new ids (and an empty timeline). Closing by PATCH
 * does not freeze the final results: the API calls tly_poll_freeze_results after it.
 */
int tly_poll_patch(tly_poll_t *p, json_t *body, int64_t now, const char **err_field, const char **err_msg,
                   char *err_buf, size_t err_buf_len);
void tly_poll_free(tly_poll_t *p);
/* Another instance changed p (a PATCH, a close, frozen results): takes over from `from`,
 * a poll built from the stored row, its title, description, status, times, settings,
 * final results (unless `from` has none: final results are never taken back) and
 * option texts (the option list itself only while p has no ballot, which is also when a
 * PATCH may change it), keeps p's ballots and counts, marks the results for
 * re-rendering, and frees `from`. Loop thread. */
void tly_poll_adopt(tly_poll_t *p, tly_poll_t *from);
/* The status a reader sees at `now`: a draft with a start_time is active once it passes
 * (a scheduled poll), and an active poll whose end_time has passed is closed. */
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
int tly_poll_add_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v); /* 0 or TLY_ENOMEM (not added) */
/* Marks v committed and counts it (options' votes, total_votes, the timelines and
 * votes_last_minute at v->recorded_at, seq, as_of = now, results dirty). Committing an
 * already committed vote does nothing. pending_votes is the caller's to maintain. */
void tly_poll_commit_vote(tly_poll_t *p, tly_vote_t *v, int64_t now);
/* Files v under another voter (a device's ballot becoming its account's when the two
 * are linked): voter_id is copied and p's map finds v by it from now on; counts, ids,
 * the address entry and the state are v's as before. Nothing is allocated in the map,
 * so it cannot fail half-way. Returns 0, TLY_EEXIST (p holds a vote of voter_id:
 * nothing changes), TLY_EINVAL (v is not in p's map) or TLY_ENOMEM (nothing changes). */
int tly_poll_rekey_vote(tly_poll_t *p, tly_vote_t *v, const char *voter_id);
/* Removes a pending vote whose commit failed (p->votes, receipts and its address in
 * p->ip_votes) and frees it. */
void tly_poll_drop_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v);
/* Retracts v (DELETE votes/me): uncounts it when committed (total_votes, options, the
 * timelines at v->recorded_at, seq, as_of = now, results dirty), removes it from
 * p->votes, the receipts and p->ip_votes (so its address may vote again) and frees
 * it. votes_last_minute is not lowered: it counts activity (ballots cast or changed),
 * not ballots standing. r may be NULL for a poll outside one. Whether a retraction is
 * allowed (allow_vote_change, the poll still accepting votes: tly_poll_accepts_votes)
 * is the caller's to check. */
void tly_poll_retract_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v, int64_t now);
/*
 * Replaces committed vote v's ballot with b (PUT votes/me, after the store committed
 * the change), in one step: the old ballot is uncounted and the new one counted in the
 * options, score sums and timelines (old at the old recorded_at, new at now) within
 * this call, so no reader on the loop thread sees both or neither. vote_id, receipt,
 * voter_id, idem_key and body_hash are kept (an Idempotency-Key replay of the original
 * cast is the API's to answer: a vote with an idem_key keeps, from its first change on,
 * the ballot and time it was cast with, see tly_vote_cast_option_ids); recorded_at
 * becomes now; total_votes is unchanged; seq grows, as_of = now, results dirty, and
 * the change counts in votes_last_minute (even when b equals the old ballot: the API
 * may skip such a no-op before calling). The vote's address stays in p->ip_votes (a
 * change is not a new ballot).
 *
 * A ballot with more choices than v holds needs a larger vote: v is then reallocated
 * and the new address replaces it in p->votes and r's receipt map (moved in place, no
 * allocation in the maps), and v must not be used again. *out is always the vote to
 * use afterwards (v itself when it did not move). r must be the registry v was added
 * with (NULL only when v was added without one).
 *
 * Returns 0; TLY_ENOMEM, TLY_ESTATE (v is still pending: only committed votes change)
 * or TLY_EINVAL (b has a choice outside p's options, v is not p's vote, or r is not
 * v's registry), each leaving p, v and the maps unchanged with *out = v. b must have
 * been validated for p (tly_ballot_parse). Whether a change is allowed
 * (allow_vote_change, tly_poll_accepts_votes) is the caller's to check. Loop thread.
 */
int tly_poll_change_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v, const tly_ballot_t *b, int64_t now,
                         tly_vote_t **out);

/*
 * The ballot as first cast. A retry of the POST that cast a vote (same Idempotency-Key
 * and body) must get that POST's answer again, the ballot and time it was cast with,
 * even after the vote was changed. So a vote with an idem_key keeps, from its first
 * change on, a copy of the ballot it was cast with and its recorded_at (the store keeps
 * the same copy with the ballot row and load gives it back: tly_vote_set_cast). A vote
 * without a key cannot be replayed and keeps none. Memory: about 16 + 2 * nchoices
 * bytes per changed vote with a key, nothing for the others. Loop thread.
 */

/* The option ids of v as first cast, in the form tly_vote_option_ids gives, as a new
 * JSON reference, with *cast_at its time; for a vote never changed (or keeping no copy)
 * its current ballot and recorded_at. NULL when out of memory. */
json_t *tly_vote_cast_option_ids(const tly_poll_t *p, const tly_vote_t *v, int64_t *cast_at);
/* Sets the ballot v was first cast with and its time (at load, from the store's copy),
 * replacing any copy v had. v must have been added to its poll (tly_poll_add_vote).
 * Returns 0, TLY_EINVAL (more than TLY_MAX_OPTIONS choices, or a choice outside the
 * poll's options: v unchanged) or TLY_ENOMEM (v unchanged). */
int tly_vote_set_cast(tly_vote_t *v, const tly_ballot_t *b, int64_t cast_at);

/* ---- client addresses (settings.voter_check "ip" / "token+ip") ---- */

/*
 * Each poll keeps the set of addresses its ballots were cast from, as keyed hashes
 * (TLY_IP_HASH_LEN bytes; the API computes them, core never sees an address), each
 * mapped to its ballot. A ballot enters the set when it is accepted (pending), leaves
 * it when retracted or dropped, and keeps its entry across changes; the set is rebuilt
 * at load from the hashes stored with the ballots. Memory: one entry (about 90 bytes)
 * per ballot of a poll that checks addresses, none otherwise; bounded by the ballots.
 * Loop thread.
 */

/* The vote (pending or committed) cast from the address with this hash, or NULL. */
tly_vote_t *tly_poll_find_ip(const tly_poll_t *p, const uint8_t ip_hash[TLY_IP_HASH_LEN]);
/*
 * Records that v, already added to p (tly_poll_add_vote), was cast from the address
 * with this hash: p->ip_votes maps it to v until v is retracted or dropped. Copies the
 * hash. Returns 0, TLY_EEXIST (another vote holds that hash: nothing changes; check
 * with tly_poll_find_ip first), TLY_EINVAL (v is not p's, or already has an address)
 * or TLY_ENOMEM (nothing changes).
 */
int tly_poll_set_vote_ip(tly_poll_t *p, tly_vote_t *v, const uint8_t ip_hash[TLY_IP_HASH_LEN]);
/* v's address hash (TLY_IP_HASH_LEN bytes, owned by p, valid while v is p's), or NULL
 * when v has none. */
const uint8_t *tly_vote_ip_hash(const tly_vote_t *v);
/* How many addresses p's set holds (one per ballot cast under an address rule). */
size_t tly_poll_ip_count(const tly_poll_t *p);

/* ---- timelines and votes_last_minute ---- */

/*
 * The timeline invariant: at each resolution, the buckets count the ballots currently
 * counted, each at the bucket of its last cast or change (v->recorded_at), for each
 * option it counts for (the options whose `votes` it adds to: chosen; ranked: first;
 * score: scored above 0). So summing one option over all buckets gives its `votes`.
 * tly_poll_commit_vote adds, tly_poll_retract_vote subtracts, tly_poll_change_vote
 * does both; nothing ever scans the ballots. Buckets of 10 s, 1 min and 1 h, kept up
 * to TLY_TIMELINE_MAX_10S / _1M / _1H buckets each (about a day, a week and a year of
 * continuous voting; windows without ballots take no room). A bucket takes
 * 8 + 4 * noptions bytes (rounded up to 8): at most about 440 KB per 2-option poll,
 * 11 MB per 100-option poll, grown by doubling as windows fill. At the bound the
 * oldest bucket is dropped; when memory runs out the oldest bucket is dropped instead
 * of growing (with no bucket yet, the ballot's own window is given up). Ranges before
 * the end of a dropped window are then no longer available at that resolution
 * (coarser ones still have them; the JSON says "available_from"), and ballots cast,
 * changed or retracted there no longer change it, so every bucket still kept stays
 * exact. Counting a ballot therefore never fails.
 */
#define TLY_TIMELINE_10S INT64_C(10000)
#define TLY_TIMELINE_1M INT64_C(60000)
#define TLY_TIMELINE_1H INT64_C(3600000)
#define TLY_TIMELINE_MAX_10S 8640
#define TLY_TIMELINE_MAX_1M 10080
#define TLY_TIMELINE_MAX_1H 8760
#define TLY_TIMELINE_MAX_ITEMS 1000

/* The bucket size in ms for "10s", "1m" or "1h"; 0 for anything else (400). */
int64_t tly_timeline_bucket_ms(const char *name);
/*
 * The timeline of p at resolution bucket_ms (TLY_TIMELINE_10S, _1M or _1H) as a new
 * JSON reference: {"bucket":"10s"|"1m"|"1h","items":[{"start":"<RFC 3339 ms>",
 * "counts":{"<option_id>":n,...}},...]}, oldest first, listing only buckets with a
 * ballot whose start lies in [from, to) (ms; 0 and INT64_MAX for open ends). `counts`
 * names only the options with n > 0. At most TLY_TIMELINE_MAX_ITEMS items: when more
 * follow, "truncated": true is added and the caller pages on with from = the last
 * start + bucket_ms. When older buckets were dropped (see above), "available_from"
 * gives the start of the range still kept. NULL when out of memory or for another
 * bucket_ms (check it with tly_timeline_bucket_ms first). Loop thread.
 */
json_t *tly_timeline_json(const tly_poll_t *p, int64_t bucket_ms, int64_t from, int64_t to);
/*
 * Ballots cast (committed, counted at their recorded_at) or changed in the last
 * minute: those whose second (floor(ms / 1000)) is one of the 60 seconds ending with
 * now's, so exact to the second. Retractions do not subtract (it measures activity).
 * Events more than a minute older than a later one are forgotten as they arrive. O(60).
 */
uint64_t tly_poll_votes_last_minute(const tly_poll_t *p, int64_t now);

/* ---- results ---- */

/*
 * Percentages with one decimal: pct[i] = 100 * votes[i] / total, rounded to one decimal.
 * When `largest_remainder` is set (single-choice polls, where the counts sum to total)
 * the tenths are apportioned by the largest-remainder method so they sum to exactly
 * 100.0 (ties to the lower index); otherwise each is rounded half up independently.
 * total == 0 gives all zeros. pct is in tenths of a percent (e.g. 333 = 33.3%).
 */
void tly_percentages(const uint64_t *votes, size_t n, uint64_t total, bool largest_remainder, int *pct_tenths);
/*
 * The results object of API.md for p at `now`, as a compact JSON string, plus
 * "votes_last_minute" (tly_poll_votes_last_minute at now) as its last member.
 *
 * Reads are O(1) between changes: the object without votes_last_minute is cached in p
 * and rebuilt only when a count changed or the effective status moved; the cache keeps
 * room after it, so a new votes_last_minute (the minute slid) only rewrites those few
 * bytes in place, never re-rendering the object. A rebuild is O(options), and for a
 * ranked poll O(options^2 + total ranking length): see tly_results_render_cost and the
 * jobs below for counting a big one elsewhere.
 *
 * A closed poll (effective status at now) serves its final results: frozen on the
 * first render after the close (tly_poll_freeze_results) unless the API froze or set
 * them before, then served as they are, with "status":"closed" and "final":true, never
 * re-rendered. While ballots accepted before the close are still pending, or while a
 * poll whose final results come from the store (final_by_store) has none yet, the
 * current counts are rendered instead (without "final").
 *
 * The returned string is owned by p and valid until the next call for p or change to
 * p; NULL on allocation failure. Loop thread.
 */
const char *tly_results_render(tly_poll_t *p, int64_t now, size_t *len);
/*
 * Counting off the loop. A ranked poll's results cost O(total ranking length) to render
 * (the instant-runoff count; the Condorcet pairs are kept as ballots come and go, so
 * they cost O(options^2)): about 10 ms for 30,000 rankings of 100 options. A caller that
 * must not spend that on its thread asks for the cost first and, above its own bound,
 * renders through a job: snapshot on the loop, count on any thread, install back on the
 * loop, and meanwhile serves the cached rendering when it is recent enough.
 */

/* The ballot choices the next tly_results_render(p, now) would walk: 0 when it serves
 * the cached rendering or final results as they are (or freezes them: once), or renders
 * in O(options) (every type but ranked); for a ranked poll, the choices in its rankings
 * (or an estimate from its ballots when its table is to be built). Loop thread. */
size_t tly_results_render_cost(const tly_poll_t *p, int64_t now);

typedef struct tly_results_job tly_results_job_t;
/*
 * A job rendering p's results at `now` as they are now: every count and the Condorcet
 * winner are taken here, in O(options^2 + rankings / 256) (a snapshot of the rankings:
 * chunks shared with p, copied on p's next write to them, see ranked.c). NULL when out of
 * memory. The job belongs to the caller (tly_results_job_free). Loop thread.
 */
tly_results_job_t *tly_results_job_new(tly_poll_t *p, int64_t now);
/* Runs the instant-runoff count of the job's snapshot and renders the whole results
 * object, O(total ranking length). 0 or TLY_ENOMEM. Any one thread, once. */
int tly_results_job_run(tly_results_job_t *j);
/* The seq of p the job's rendering shows. Any thread. */
uint64_t tly_results_job_seq(const tly_results_job_t *j);
/*
 * Makes a run job's rendering p's cached rendering, when it is newer than the one p
 * holds (never over final results). It is then served by tly_results_cached and, when
 * nothing changed since the job was made, by tly_results_render as it is. Returns
 * whether it was installed. Loop thread.
 */
bool tly_results_job_install(tly_poll_t *p, tly_results_job_t *j);
/* Frees a job, run or not. Any thread. */
void tly_results_job_free(tly_results_job_t *j);
/*
 * p's cached rendering (with votes_last_minute at now, as tly_results_render gives it),
 * never rendering anything: only when it shows at least seq min_seq (so every ballot
 * committed before p->seq reached min_seq) and the status effective at now, and is not
 * the final results (those are tly_results_render's). It may be older than p's counts.
 * *seq (when not NULL) gets the seq it shows. NULL otherwise. Valid until the next call
 * for p or change to p. Loop thread.
 */
const char *tly_results_cached(tly_poll_t *p, int64_t now, uint64_t min_seq, uint64_t *seq, size_t *len);

/*
 * Freezes p's final results: renders the results object once (status "closed",
 * "final": true, without votes_last_minute) into p->final_json, which p owns and
 * tly_results_render serves from then on. Call it when the poll closes (PATCH to
 * closed, or once end_time has passed) and keep tly_poll_final_results(p) in the
 * store; tly_results_render also freezes on its own when it first renders a closed
 * poll, so a poll closed by time has final results even before the API acts (the API
 * may persist them later: they are computed from the committed ballots only).
 * Returns 0 when frozen (now or before: freezing again changes nothing), TLY_ESTATE
 * while the poll is not closed at `now` or p->pending_votes > 0 (ballots accepted
 * before the close count; call again once they commit), TLY_ENOMEM (p unchanged).
 */
int tly_poll_freeze_results(tly_poll_t *p, int64_t now);
/* The final results tly_poll_freeze_results would freeze at `now`, into *out (malloc'd
 * with tly_malloc, the caller's), p unchanged: for a freeze the store must accept
 * first. Same returns (0 only with *out set). */
int tly_poll_render_final(tly_poll_t *p, int64_t now, char **out);
/* p's frozen final results (JSON text, owned by p, valid until p changes), or NULL when
 * not frozen. */
const char *tly_poll_final_results(tly_poll_t *p);
/*
 * Sets p's final results from the store at load (the text tly_poll_final_results gave
 * when they were frozen), copying it. Served as they are for as long as the poll is
 * closed. Returns 0, TLY_EINVAL when json is not a JSON object, TLY_ENOMEM (p
 * unchanged). Loop thread (or the loading thread before the loop starts).
 */
int tly_poll_set_final_results(tly_poll_t *p, const char *json);

/* ---- visibility ---- */

/* Whether a caller may see p's counts at `now`: caller_id NULL for an anonymous caller;
 * has_voted whether the caller has a committed or pending ballot in p. */
bool tly_results_visible(const tly_poll_t *p, const char *caller_id, bool has_voted, int64_t now);

#endif
