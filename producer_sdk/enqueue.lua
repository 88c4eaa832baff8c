-- layermux protocol v1: atomic check-and-enqueue (the producer-side admission gate).
-- Owned by producer_sdk; loaded by producer_sdk/enqueue.py. Runs atomically inside Redis.
-- All keys share the hash tag {m:<model>}, so the script is Redis-Cluster-safe.
--
-- KEYS[1] = P:{m:<model>}:req:high  request stream of the high band (priority > 0)
-- KEYS[2] = P:{m:<model>}:req       request stream of the normal band (priority 0)
-- KEYS[3] = P:{m:<model>}:req:low   request stream of the low band (priority < 0)
-- KEYS[4] = P:{m:<model>}:ids       hash request_id -> stream entry id
-- KEYS[5] = P:{m:<model>}:limits    hash written by the serving worker (field max_backlog)
-- ARGV[1] = request_id
-- ARGV[2] = payload (encoded RequestMessage)
-- ARGV[3] = band: 1 (high), 2 (normal) or 3 (low); the stream KEYS[ARGV[3]] receives the entry
--
-- Replies:
--   {"exists", entry_id}         the request id is already queued or running: nothing added
--   {"unknown_model"}            no worker serves the model (its limits hash is absent)
--   {"queue_full", depth, limit} backlog (XLEN summed over the bands; entries are deleted
--                                when finished, never trimmed) is at the limit: nothing added
--   {"ok", entry_id}             added
--
-- Order matters: an id that is already queued is reported as "exists" even when the queue is
-- now full or the model has gone, so a retried submit never fails after the first one won.
-- A limits hash without a numeric max_backlog means "no backlog limit".

local existing = redis.call('HGET', KEYS[4], ARGV[1])
if existing then
    return {'exists', existing}
end

if redis.call('EXISTS', KEYS[5]) == 0 then
    return {'unknown_model'}
end

local band = tonumber(ARGV[3])
if band ~= 1 and band ~= 2 and band ~= 3 then
    return redis.error_reply('ERR enqueue: band must be 1, 2 or 3, found ' .. tostring(ARGV[3]))
end

local depth = redis.call('XLEN', KEYS[1]) + redis.call('XLEN', KEYS[2]) + redis.call('XLEN', KEYS[3])
local limit = tonumber(redis.call('HGET', KEYS[5], 'max_backlog'))
if limit and depth >= limit then
    return {'queue_full', depth, limit}
end

local entry_id = redis.call('XADD', KEYS[band], '*', 'data', ARGV[2])
redis.call('HSET', KEYS[4], ARGV[1], entry_id)
return {'ok', entry_id}
