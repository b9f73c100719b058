/*
 * genballots: writes N generated ballots for an existing poll straight through the store
 * layer (not HTTP), for the export benchmark and tests. Run it while no server uses the
 * data directory; the server sees the ballots at its next start.
 *
 *   tally-genballots --data-dir DIR --poll POLL_ID --options N --count N
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "store/store.h"

int main(int argc, char **argv)
{
    const char *dir = NULL, *poll = NULL;
    long options = 0, count = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--data-dir"))
            dir = argv[i + 1];
        else if (!strcmp(argv[i], "--poll"))
            poll = argv[i + 1];
        else if (!strcmp(argv[i], "--options"))
            options = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--count"))
            count = strtol(argv[i + 1], NULL, 10);
    }
    if (dir == NULL || poll == NULL || options < 1 || count < 1) {
        fprintf(stderr, "usage: tally-genballots --data-dir DIR --poll POLL_ID --options N --count N\n");
        return 2;
    }
    tly_store_t *s;
    tly_store_conf_t conf = {.data_dir = dir};
    int rc = tly_store_open(&conf, &s);
    if (rc != 0) {
        fprintf(stderr, "genballots: cannot open the store in %s (%d)\n", dir, rc);
        return 1;
    }
    rc = tly_store_generate_ballots(s, poll, (size_t)options, (size_t)count);
    tly_store_close(s);
    if (rc != 0) {
        fprintf(stderr, "genballots: failed (%d)\n", rc);
        return 1;
    }
    printf("wrote %ld ballots for poll %s\n", count, poll);
    return 0;
}
