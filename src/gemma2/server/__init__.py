"""An OpenAI-compatible HTTP server over the engine (`gemma2 serve`): FastAPI routes, one engine thread.

Floor 5: nothing in the package imports it. The web stack (fastapi, uvicorn, prometheus-client)
is imported only by these modules.
"""
