"""The OpenAI-compatible HTTP server (`python -m engine.server`); built on the engine's API.

`OpenAIServer(LLMEngine(args), ServerConfig(...))` owns the routes and the AsyncEngine;
`ServerThread(server).start()` runs it in the background and returns its URL.
"""

from engine.server.app import OpenAIServer, ServerConfig, ServerThread

__all__ = ["OpenAIServer", "ServerConfig", "ServerThread"]
