#!/usr/bin/env python3
"""Exactly-once accounting for a vote run of bench/votes.lua.

usage: account.py REPORT TOKENS_FILE BASE_URL POLL_ID TOTAL_VOTES

wrk stops on a timer, abandoning the request in flight on each connection; the server may
still commit those ballots after wrk has stopped reading. So the poll's total_votes must
equal the 200s wrk read plus the abandoned ballots that were committed. This finds those:
for the last TAIL voters each wrk thread sent, it asks GET /v1/polls/{id}/votes/me; a voter
the server counts whose vote_id wrk never read in a 200 is a late commit. Every abandoned
request is among the last few sent on its thread (one per connection), so TAIL (1024, far
above the connections per thread) covers them all; the check below also proves it did.

Prints one line; exit status 0 only if TOTAL_VOTES == 200s + late commits and every
unanswered request was accounted for.
"""
import http.client
import json
import sys
import urllib.parse

TAIL = 1024


def main() -> int:
    report, tokens_path, base, poll, total = sys.argv[1:6]
    total = int(total)
    threads, vids, totals = [], set(), None
    with open(report) as f:
        for line in f:
            w = line.split()
            if w[0] == "thread":
                threads.append(tuple(int(x) for x in w[1:7]))
            elif w[0] == "vid":
                vids.add(w[1])
            elif w[0] == "total":
                totals = tuple(int(x) for x in w[1:6])
    if totals is None:
        print("FAILED: no totals in the wrk report")
        return 1
    sent, answered, ok, other, exhausted = totals
    unanswered = sent - answered

    with open(tokens_path, "rb") as f:
        line_len = len(f.readline())
        u = urllib.parse.urlsplit(base)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        late = never = seen_ok = 0
        for _tid, first, tsent, _resp, _ok, _exh in threads:
            start = first + max(0, tsent - TAIL)
            f.seek(start * line_len)
            for _ in range(start, first + tsent):
                token = f.readline().strip().decode()
                conn.request("GET", f"/v1/polls/{poll}/votes/me",
                             headers={"Authorization": "Bearer " + token})
                r = conn.getresponse()
                body = json.loads(r.read())
                if r.status != 200:
                    print(f"FAILED: votes/me answered {r.status}: {body}")
                    return 1
                if not body["has_voted"]:
                    never += 1
                elif body["vote_id"] in vids:
                    seen_ok += 1
                else:
                    late += 1
        conn.close()

    # Among the tail: answered 200s (seen_ok), late commits (late) and voters the server
    # does not count (never: abandoned and not committed, or refused with a non-200).
    # Abandoned requests are late + (never - refused); with no refusals in the tail they
    # must add up to every unanswered request, which shows the tail held them all.
    covered = late + never == unanswered if other == 0 else late <= unanswered
    exact = total == ok + late
    verdict = "OK" if exact and covered and exhausted == 0 else "FAILED"
    print(f"{verdict}: total_votes {total} = {ok} answered 200 + {late} committed after wrk "
          f"stopped reading ({unanswered} requests were in flight at its cut-off, "
          f"{unanswered - late} of them not committed); non-200 {other}"
          + ("" if exact else f"; MISMATCH by {total - ok - late}")
          + ("" if covered else "; the tail did not hold every unanswered request")
          + ("" if exhausted == 0 else f"; {exhausted} requests reused voters"))
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
