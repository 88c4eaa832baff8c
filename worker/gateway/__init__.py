"""The OpenAI-compatible HTTP gateway (`layermux serve`): one more producer in front of the queue.

Read in this order: app.py (routes, API keys, SSE), relay.py (the queued requests behind one HTTP
request), openai_schema.py (bodies), errors.py (the error table), metrics.py, server.py (uvicorn).
"""
