/*
 * metrics_help.c: the HELP lines of the counter families recorded with
 * tly_metrics_count, and their names, in one place.
 */
#include <string.h>

#include "obs/obs.h"

const char *tly_metrics_help(const char *family)
{
    static const struct {
        const char *family, *help;
    } helps[] = {
        {"tally_votes_total",
         "Ballot requests (POST votes) by outcome: recorded, accepted (async), or the error code."},
        {"tally_vote_changes_total", "Vote changes and retractions (PUT/DELETE votes/me) by outcome."},
        {"tally_rate_limited_total", "Requests refused by a rate limit, by route."},
        {"tally_errors_total", "Error responses by error code."},
        {"tally_webhook_deliveries_total",
         "Webhook delivery attempts by outcome: delivered (a 2xx answer), retried (no 2xx answer, another attempt "
         "follows), refused (the destination is not a public address nor allowed) or dead_lettered."},
        {"tally_ranked_counts_total",
         "Counts of big ranked polls run on a worker thread, by outcome: installed (served from then on), "
         "superseded (a newer rendering was there first, or the poll is gone) or failed (out of memory)."},
    };
    for (size_t i = 0; i < sizeof(helps) / sizeof(helps[0]); i++)
        if (strcmp(helps[i].family, family) == 0)
            return helps[i].help;
    return "A counter.";
}
