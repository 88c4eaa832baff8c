"""The arq job path with several workers: a `generate` job reaches a worker that serves its model.

Two real worker processes on one real Redis and one key prefix, each serving a different model;
jobs go through worker.arq_app.enqueue_generate (the model's own arq queue) and come back through
job_result, whose failures are the SDK's typed errors.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from faultlib import Fleet, make_models, wait_until

from producer_sdk import RejectedError, UnknownModelError
from producer_sdk.keys import Keys

PREFIX = "arqq"
WAIT_S = 120.0  # bounds a hung job only


def test_jobs_reach_the_worker_that_serves_their_model_and_failures_are_typed(tmp_path: Path,
                                                                              redis_url: str) -> None:
    from worker.arq_app import create_job_pool, enqueue_generate, job_result

    models = make_models(tmp_path / "models", ["ma", "mb"])
    fleets = [Fleet(tmp_path, redis_url, PREFIX, {"ma": models["ma"]}),
              Fleet(tmp_path, redis_url, PREFIX, {"mb": models["mb"]})]
    client = redis.Redis.from_url(redis_url)
    try:
        for fleet, worker_id in zip(fleets, ("serves-ma", "serves-mb")):
            fleet.start(worker_id).wait_ready(client)

        async def run() -> None:
            pool = await create_job_pool(redis_url)
            try:
                jobs = [await enqueue_generate(pool, model, prefix=PREFIX, prompt_ids=[1, 2, 3], max_tokens=4,
                                               temperature=0.0)
                        for model in ("ma", "mb") for _ in range(6)]
                results = [await job_result(job, timeout=WAIT_S) for job in jobs]
                assert all(len(r["token_ids"]) >= 1 for r in results)
                assert len({tuple(r["token_ids"]) for r in results[:6]}) == 1  # greedy: the same tokens

                too_long = await enqueue_generate(pool, "mb", prefix=PREFIX, prompt_ids=[1], max_tokens=999_999)
                with pytest.raises(RejectedError) as refused:
                    await job_result(too_long, timeout=WAIT_S)
                assert refused.value.code == "max_tokens_over_limit"
                assert refused.value.details["needed"] == 999_999

                with pytest.raises(UnknownModelError):
                    await enqueue_generate(pool, "mc", prefix=PREFIX, prompt_ids=[1], max_tokens=4)
            finally:
                await pool.aclose()

        asyncio.run(run())
        # Each worker counted only its own model's jobs.
        keys = Keys(PREFIX)
        for model, worker_id in (("ma", "serves-ma"), ("mb", "serves-mb")):
            def done(model: str = model) -> bool:
                return int(client.hget(keys.stats(model), "done") or 0) == 6  # refreshed every second

            wait_until(done, WAIT_S, f"{model}'s stats to count its 6 jobs")
            assert client.hget(keys.stats(model), "worker") == worker_id.encode()
    finally:
        for fleet in fleets:
            fleet.close()
        client.close()
