"""``tbrun serve``: an OpenAI-compatible HTTP API over the engine (FastAPI, served by uvicorn).

``app.py`` the routes, ``protocol.py`` the wire format, ``worker.py`` the one generation thread
and its bounded queue, ``text.py`` prompts in and streamed text out. Prefix reuse lives in
``offload_engine.session``.
"""

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
