-- wrk script: POST questions to /ask; counts 200 vs 429 (scripts/load-check.sh).
local statuses = {}
request = function()
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. (os.getenv("DOMAINRAG_KEY") or "")},
    '{"question": "How do I create a partial index?"}')
end
response = function(status)
  statuses[status] = (statuses[status] or 0) + 1
end
done = function()
  for s, n in pairs(statuses) do io.write(string.format("status %d: %d\n", s, n)) end
end
