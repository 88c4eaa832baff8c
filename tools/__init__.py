"""Developer and demo tooling, outside the product packages (engine, worker, producer_sdk).

model_factory.py writes random-weight Hugging Face model folders (tests, benchmarks, the demo);
embedded_redis.py starts a private redis-server (tests, `layermux redis`, a worker without
redis_url); demo.py is `layermux demo`. The wheel ships this package so those commands work
after `pip install`; nothing in engine/ imports it, and worker/ only lazily, inside the commands.
"""
