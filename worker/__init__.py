"""layermux worker: Redis request streams in, engine runs, reply streams out.

Code map, in reading order:

- settings.py      Settings (pydantic-settings: LAYERMUX_* env, TOML file), parse_bytes
- admission.py     read_verdict (may a model read now?), check_request (can it ever run?)
- engine_driver.py EngineDriver: the Engine, tokenizing, detokenizing, stop strings, Run
- consumer.py      ModelConsumer: XREADGROUP / XAUTOCLAIM, checks, leases, cancel watcher
- publisher.py     Publisher: ordered, coalesced reply events; ack after the terminal event
- runtime.py       Runtime: supervision of all of the above, stats, drain, the arq job path
- metrics.py       Prometheus counters and their HTTP endpoint
- arq_app.py       WorkerSettings (arq CLI), generate (arq job), run (layermux worker)
"""
