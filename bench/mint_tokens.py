#!/usr/bin/env python3
"""Mint COUNT HS256 voter tokens, one per line, for bench/votes.lua.

usage: mint_tokens.py SECRET COUNT OUTFILE [TTL_SECONDS]

Each token is header {"alg":"HS256","typ":"JWT"}, payload
{"sub":"voter-NNNNNNNN","iat":now,"exp":now+ttl}, signed with HMAC-SHA256 keyed by the
secret string's bytes (what `tally serve --secret SECRET` verifies). Voter numbers are
zero-padded to a fixed width, so every line has the same length and wrk threads can seek
straight to their own slice of the file.
"""
import base64
import hashlib
import hmac
import sys
import time


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def main() -> int:
    if len(sys.argv) not in (4, 5):
        sys.stderr.write(__doc__)
        return 2
    key = sys.argv[1].encode()
    count = int(sys.argv[2])
    out = sys.argv[3]
    ttl = int(sys.argv[4]) if len(sys.argv) == 5 else 3600
    now = int(time.time())
    head = b64(b'{"alg":"HS256","typ":"JWT"}') + b"."
    # The payload bytes differ only in the voter number; build them from two halves.
    pre = b'{"sub":"voter-'
    post = b'","iat":%d,"exp":%d}' % (now, now + ttl)
    digest = hmac.digest
    enc = base64.urlsafe_b64encode
    lines = []
    append = lines.append
    with open(out, "wb", buffering=1 << 20) as f:
        for n in range(count):
            payload = pre + b"%08d" % n + post
            signing = head + enc(payload).rstrip(b"=")
            sig = enc(digest(key, signing, hashlib.sha256)).rstrip(b"=")
            append(signing + b"." + sig + b"\n")
            if len(lines) == 65536:
                f.write(b"".join(lines))
                lines.clear()
        f.write(b"".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
