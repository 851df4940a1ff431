-- wrk script for the harness's read phase (benches/harness.rs): GETs the paths listed,
-- one per line, in the file named by the first argument, round-robin, with the API token
-- named by the second as a bearer token.
--   wrk -t1 -c50 -d10s --latency -s bench/reads.lua http://127.0.0.1:PORT -- paths.txt TOKEN
local paths = {}
local headers = {}
local next_path = 1

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then paths[#paths + 1] = line end
  end
  headers["Authorization"] = "Bearer " .. args[2]
end

function request()
  local path = paths[next_path]
  next_path = next_path % #paths + 1
  return wrk.format("GET", path, headers)
end
