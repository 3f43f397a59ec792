-- wrk script: POST a form-encoded body, and print the numbers bench/run.py reads as one JSON line
-- (wrk's own summary has no p99). bench/run.py sets the environment:
--   WRK_BODY           the body, e.g. refresh_token=<a sealed token>
--   WRK_BODIES_FILE    or a file of bodies, one a line, sent in turn (each thread from its own place):
--                      many tokens, each refreshed no more often than a real app's
--   WRK_AUTHORIZATION  an Authorization header, when talking to the fake accounts service directly

wrk.method = "POST"
local bodies_file = os.getenv("WRK_BODIES_FILE")
if bodies_file and bodies_file ~= "" then
  local bodies, threads = {}, 0
  for line in io.lines(bodies_file) do bodies[#bodies + 1] = line end

  function setup(thread)
    thread:set("start", threads)
    threads = threads + 1
  end

  local next_body = 0
  function init(args)
    next_body = (start or 0) * math.floor(#bodies / 2)
  end

  function request()
    next_body = next_body + 1
    return wrk.format(nil, nil, nil, bodies[next_body % #bodies + 1])
  end
else
  wrk.body = assert(os.getenv("WRK_BODY"), "set WRK_BODY or WRK_BODIES_FILE")
end
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
local authorization = os.getenv("WRK_AUTHORIZATION")
if authorization and authorization ~= "" then
  wrk.headers["Authorization"] = authorization
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
