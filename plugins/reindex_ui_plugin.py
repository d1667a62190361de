"""Registers the ``reindex`` UI plugin with Airflow's plugin manager (Airflow 3 UI, FastAPI).

* ``fastapi_apps``: the plugin's pages and JSON API, mounted by the api-server at ``/reindex``
  (``reindex_ui.app``, imported on the first request: ``reindex_ui.asgi``); every route authenticates with Airflow's own JWT (bearer header or the UI's
  ``_token`` cookie) and asks the auth manager for the DAG permission it needs.
* ``external_views``: a top-level "Reindex" entry in the navigation (the corpora overview) and a "Reindex"
  tab on every DAG run (the run's batches; a run of a DAG that is not a reindex DAG says so).
  Their ``href`` has no leading slash: the UI resolves it against the api-server's base URL.

The views are served as plain HTML (no JS build) inside the UI's iframes.

* ``listeners``: ``reindex_ui.run_notes`` writes a finished reindex run's outcome into its note.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from reindex_ui import run_notes
from reindex_ui.asgi import RUN_TAB_ROUTE, URL_PREFIX, app


class ReindexUIPlugin(AirflowPlugin):
    name = "reindex_ui"
    listeners = [run_notes]  # a finished reindex run's note says its batch's outcome
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "reindex"}]
    external_views = [
        # nav_top_level: its own entry in the navigation bar, not one in the "Plugins" menu
        {"name": "Reindex", "href": f"{URL_PREFIX.lstrip('/')}/", "destination": "nav",
         "url_route": "reindex", "nav_top_level": True},
        {"name": "Reindex", "href": f"{URL_PREFIX.lstrip('/')}/runs/{{DAG_ID}}/{{RUN_ID}}", "destination": "dag_run",
         "url_route": RUN_TAB_ROUTE},
    ]
