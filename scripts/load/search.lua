-- wrk script: POST hybrid searches with a rotating set of questions (scripts/load-check.sh).
local queries = {
  "how do I create a partial index", "reclaim disk space after deleting rows",
  "pg_dump restore into another database", "configure streaming replication",
  "what does VACUUM FULL lock", "create a role with login", "explain analyze output",
  "set work_mem for a session",
}
local i = 0
request = function()
  i = i + 1
  local body = string.format('{"query": "%s", "mode": "hybrid", "k": 5}', queries[(i % #queries) + 1])
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. (os.getenv("DOMAINRAG_KEY") or "")}, body)
end
