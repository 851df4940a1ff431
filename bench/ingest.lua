-- wrk script for the harness's ingestion phase (benches/harness.rs, `wrk_ingest`): POSTs
-- each delivery of the file named by the first argument once, in order, to
-- /webhooks/stripe. Each line is a delivery: its Stripe-Signature header, a tab, then its
-- JSON body (compact, one line). Once every delivery is answered, wrk is interrupted
-- (SIGINT, as Ctrl-C would) so that it stops and prints its summary at once instead of at
-- the end of its -d duration. The second argument names two files this script creates,
-- MARKS.started when the first delivery goes out and MARKS.done once every delivery is
-- answered, so that the harness can see the run end if that SIGINT does not stop wrk.
--   wrk -t1 -c32 -d600s --latency -s bench/ingest.lua http://127.0.0.1:PORT -- deliveries.tsv MARKS
-- Run it with one thread (-t1): the deliveries are handed out by this thread's own count.
local deliveries = {}
local marks = nil
local next_delivery = 1
-- Deliveries answered (whatever the status): every answer but the fillers' (below).
local answered = 0
-- When the last delivery went out (os.time(), seconds), once it has.
local all_sent_at = nil

local function mark(suffix)
  if marks then
    local file = io.open(marks .. "." .. suffix, "w")
    if file then file:close() end
  end
end

function init(args)
  marks = args[2]
  for line in io.lines(args[1]) do
    local tab = string.find(line, "\t", 1, true)
    if tab then
      deliveries[#deliveries + 1] = wrk.format("POST", "/webhooks/stripe", {
        ["Stripe-Signature"] = string.sub(line, 1, tab - 1),
        ["Content-Type"] = "application/json",
      }, string.sub(line, tab + 1))
    end
  end
end

-- wrk calls request() once before it starts (in main, to count the requests a call
-- returns: script_verify_request in its src/wrk.c); that request is never sent.
local verified = false

function request()
  if not verified then
    verified = true
    return deliveries[1]
  end
  local delivery = deliveries[next_delivery]
  if delivery then
    if next_delivery == 1 then mark("started") end
    next_delivery = next_delivery + 1
    return delivery
  end
  -- Every delivery is out: the connections still asking wait on a filler, a cheap
  -- request whose answer ("ok") no webhook gives, until the last delivery is answered.
  all_sent_at = all_sent_at or os.time()
  return wrk.format("GET", "/healthz")
end

local function stop()
  local stat = io.open("/proc/self/stat")
  local pid = stat:read("*n")
  stat:close()
  -- Not os.execute: system() ignores SIGINT until its command ends, which loses it.
  io.popen("kill -INT " .. pid):close()
end

function response(status, headers, body)
  if body == "ok" then
    -- A delivery whose connection broke is never answered (wrk counts a socket error and
    -- goes on): stop 3 s after the last one went out rather than at the end of -d.
    if all_sent_at and os.time() - all_sent_at >= 3 and answered < #deliveries then
      all_sent_at = math.huge
      stop()
    end
    return
  end
  answered = answered + 1
  if answered == #deliveries then
    mark("done")
    stop()
  end
end
