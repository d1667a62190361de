"""What the plugin registration imports: the mount point, the tab's route, and a lazy ASGI app.

Airflow imports every plugin in every process that loads plugins — each task's process too (for
its macros). The plugin's real app (``reindex_ui.app``) pulls in the api-server's security stack
(about 1.4 s and 700 modules), which only the api-server needs; so the app mounted at
``URL_PREFIX`` is a stand-in that imports the real one on its first request, in a worker thread.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

URL_PREFIX = "/reindex"
RUN_TAB_ROUTE = "reindex-run"  # the dag_run tab's ``url_route``: /dags/<dag>/runs/<run>/plugin/reindex-run


class LazyApp:
    """An ASGI app that is ``module:attribute``, imported when the first request arrives."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._app: Any = None
        self._lock = threading.Lock()

    def load(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    module, _, attr = self.target.partition(":")
                    self._app = getattr(importlib.import_module(module), attr)
        return self._app

    async def __call__(self, scope, receive, send) -> None:
        app = self._app
        if app is None:
            from anyio import to_thread

            app = await to_thread.run_sync(self.load)  # the import must not stall the api-server's event loop
        await app(scope, receive, send)


app = LazyApp("reindex_ui.app:app")
