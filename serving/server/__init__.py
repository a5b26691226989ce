"""The HTTP inference server (FastAPI + uvicorn): ``app`` (endpoints and the command),
``requests`` (validation), ``batching`` (dynamic batching) and ``schemas`` (the OpenAPI models).
Imported lazily: nothing outside this package imports it at module level."""
