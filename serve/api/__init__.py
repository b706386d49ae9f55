"""saelora.serve.api: the HTTP edge. The FastAPI app and its module-level routes (app.py), the request handlers
(handlers.py), the OpenAI error envelope (errors.py) and the Prometheus metrics (metrics.py). It talks to any
`saelora.serve.core.engine.Engine`."""
