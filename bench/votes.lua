-- votes.lua: wrk script for the vote path, POST /v1/polls/{poll_id}/votes.
--
--   wrk -t2 -c64 -d10s --latency -s bench/votes.lua \
--       http://127.0.0.1:PORT/v1/polls/POLL_ID/votes -- TOKENS_FILE THREADS OPT1,OPT2,OPT3
--
-- TOKENS_FILE holds one bearer token per line, every line the same length (see
-- bench/mint_tokens.py), each for a different voter. THREADS must equal wrk's -t: the file
-- is cut into THREADS equal slices and thread i reads only slice i, one fresh token per
-- request, so no voter is ever sent twice and a 409 means the server refused a first vote.
-- Options are cycled through so every option's counter moves.
--
-- The same script drives the reference run (nginx answering the POST with a static body),
-- so both sides pay the same client-side cost per request.
--
-- done() prints, per thread and in total: requests sent, responses, 200s, other statuses,
-- and requests still unanswered when wrk stopped (wrk stops on a timer with one request in
-- flight on most connections; the server may still commit those after wrk has gone). With
-- BENCH_VOTES_REPORT=FILE in the environment it also writes what run.sh needs to account
-- for every vote exactly: per thread the token lines sent, and the vote_ids of the last
-- RING 200 responses (a 200 carries the vote_id; GET .../votes/me returns it too).

local RING = 4096

-- main state: one entry per thread, in creation order
local threads = {}

function setup(thread)
   thread:set("id", #threads)
   threads[#threads + 1] = thread
end

-- thread state (globals are per thread; thread:get reads them from done())
calls = 0       -- request() calls; on thread 0 the first is wrk's unsent verify call
responses = 0
ok = 0
statuses = {}   -- status code (as string) -> count, for codes other than 200
vids = {}       -- ring of the vote_ids of the last RING 200 responses
first_line = 0  -- index (0-based) of this thread's first token line
slice = 0       -- token lines in this thread's slice
exhausted = 0   -- requests sent after the slice ran out (they reuse voters: expect 409s)

local file, line_len, pre, post, nopt

function init(args)
   local path, nthreads, opts = args[1], tonumber(args[2]), args[3]
   if not path or not nthreads or not opts then
      error("usage: wrk ... -s votes.lua URL -- TOKENS_FILE THREADS OPT1,OPT2,...")
   end
   file = assert(io.open(path, "rb"))
   local first = assert(file:read("*l"), "empty token file")
   line_len = #first + 1
   local size = file:seek("end")
   local total = math.floor(size / line_len)
   slice = math.floor(total / nthreads)
   first_line = id * slice
   assert(file:seek("set", first_line * line_len))
   file:setvbuf("full", 65536)

   local host = wrk.headers["Host"]
   pre, post = {}, {}
   for opt in string.gmatch(opts, "[^,]+") do
      local body = '{"option_id":"' .. opt .. '"}'
      pre[#pre + 1] = "POST " .. wrk.path .. " HTTP/1.1\r\nHost: " .. host ..
         "\r\nContent-Type: application/json\r\nContent-Length: " .. #body ..
         "\r\nAuthorization: Bearer "
      post[#post + 1] = "\r\n\r\n" .. body
   end
   nopt = #pre
end

function request()
   local token = file:read("*l")
   if calls >= slice or not token then
      -- out of fresh voters: start the slice again (the server will answer 409)
      exhausted = exhausted + 1
      file:seek("set", first_line * line_len)
      token = file:read("*l")
   end
   local i = calls % nopt + 1
   calls = calls + 1
   return pre[i] .. token .. post[i]
end

function response(status, headers, body)
   responses = responses + 1
   if status == 200 then
      ok = ok + 1
      local vid = string.match(body, '"vote_id":"([^"]+)"')
      if vid then
         vids[ok % RING] = vid
      end
   else
      local k = tostring(status)
      statuses[k] = (statuses[k] or 0) + 1
   end
end

function done(summary, latency, requests)
   local report = os.getenv("BENCH_VOTES_REPORT")
   local out = report and assert(io.open(report, "w"))
   local t_sent, t_resp, t_ok, t_other, t_exh = 0, 0, 0, 0, 0
   local other = {}
   for _, thread in ipairs(threads) do
      local tid = thread:get("id")
      local skip = (tid == 0) and 1 or 0 -- wrk calls request() once on thread 0 to verify it
      local sent = thread:get("calls") - skip
      local resp, good = thread:get("responses"), thread:get("ok")
      local st = thread:get("statuses")
      local bad = 0
      for code, n in pairs(st) do
         bad = bad + n
         other[code] = (other[code] or 0) + n
      end
      local exh = thread:get("exhausted")
      io.write(string.format("thread %d: sent %d, answered %d, 200 %d, other %d, unanswered %d%s\n",
         tid, sent, resp, good, bad, sent - resp,
         exh > 0 and string.format(", TOKENS EXHAUSTED (%d reused)", exh) or ""))
      t_sent, t_resp, t_ok, t_other, t_exh = t_sent + sent, t_resp + resp, t_ok + good,
         t_other + bad, t_exh + exh
      if out then
         local fl = thread:get("first_line")
         out:write(string.format("thread %d %d %d %d %d %d\n", tid, fl + skip, sent, resp, good, exh))
         for _, vid in pairs(thread:get("vids")) do
            out:write("vid ", vid, "\n")
         end
      end
   end
   local codes = {}
   for code, n in pairs(other) do
      codes[#codes + 1] = code .. "x" .. n
   end
   table.sort(codes)
   io.write(string.format("votes: sent %d, answered %d, 200 %d, non-200 %d%s, unanswered at stop %d\n",
      t_sent, t_resp, t_ok, t_other, #codes > 0 and " (" .. table.concat(codes, " ") .. ")" or "",
      t_sent - t_resp))
   if t_exh > 0 then
      io.write(string.format("WARNING: token slices ran out; %d requests reused voters\n", t_exh))
   end
   if out then
      out:write(string.format("total %d %d %d %d %d\n", t_sent, t_resp, t_ok, t_other, t_exh))
      out:close()
   end
end
