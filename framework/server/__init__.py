"""diffstage's OpenAI-compatible server (`diffstage serve`): see README's "Serving".

    state = ServerState(run_config, serve_settings({...}))   # checks every model; loads none yet
    app = create_app(state)                                   # a FastAPI app (uvicorn.run(app, ...))"""
from .app import create_app
from .settings import ServeSettings, serve_settings
from .state import ServerState

__all__ = ["ServerState", "ServeSettings", "create_app", "serve_settings"]
