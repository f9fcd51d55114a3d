-- wrk script for bench/serve_latency.py: POST the JSON bodies listed one per line in
-- the file named by $BODIES, in order; wrk thread k of n (n = first script argument)
-- takes lines k, k+n, k+2n, ... so threads never send the same body.
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  local nthreads = tonumber(args[1])
  bodies = {}
  local i = 0
  for line in io.lines(os.getenv("BODIES")) do
    if i % nthreads == id then
      table.insert(bodies, line)
    end
    i = i + 1
  end
  sent = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  sent = sent + 1
  return wrk.format(nil, nil, nil, bodies[(sent - 1) % #bodies + 1])
end
