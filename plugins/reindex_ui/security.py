"""Who may see and do what, decided by Airflow itself.

Authentication: ``airflow.api_fastapi.core_api.security.get_user`` — the same dependency the core API
uses: a JWT in ``Authorization: Bearer …`` or, in the browser, the UI's httpOnly ``_token`` cookie
(sent with the iframe requests of the plugin's views). No credential → 401; an invalid token → 403
(Airflow's answer).

Authorization: the auth manager's ``is_authorized_dag`` for the DAG a page or action belongs to
(``DagAccessEntity.RUN``; the DAG's team as ``DagDetails.team_name``, as the core API does):
reading needs ``GET`` on the runs of that DAG, retrying needs ``POST`` (trigger a run) on
``reindex_retry``, freeing a lease ``PUT`` (edit a run) on the DAG of the run holding it.

CSRF: a request that carries a bearer token is not exposed (browsers never add that header on
their own). A cookie-authenticated POST must carry ``csrf_token`` (form field or ``X-CSRF-Token``
header): the user id signed with the api-server's ``[api] secret_key`` and a timestamp
(``itsdangerous``, valid ``CSRF_MAX_AGE_SECONDS``), which the plugin's pages put into their forms;
another site can neither read the page nor forge the signature. When the browser sends ``Origin``
it must be this server. The ``_token`` cookie is also ``SameSite=Lax``, so other sites' POSTs do
not carry it at all; the token covers same-site pages on other ports/paths.
"""

from __future__ import annotations

from functools import cache
from urllib.parse import urlsplit

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import get_user as get_user
from fastapi import HTTPException, Request, status
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

CSRF_MAX_AGE_SECONDS = 8 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_VERBS = {"GET": "read", "POST": "trigger", "PUT": "edit", "DELETE": "delete"}


def is_authorized(user: BaseUser, dag_id: str, method: str = "GET") -> bool:
    """Whether the auth manager lets ``user`` do ``method`` on the runs of ``dag_id``."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.models.dag import DagModel

    return get_auth_manager().is_authorized_dag(
        method=method, access_entity=DagAccessEntity.RUN,
        details=DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id)), user=user)


class Permissions:
    """The auth manager's answers for one request's user, asked once per (DAG, method)."""

    def __init__(self, user: BaseUser) -> None:
        self.user = user
        self._seen: dict[tuple[str, str], bool] = {}

    def can(self, dag_id: str, method: str = "GET") -> bool:
        key = (dag_id, method)
        if key not in self._seen:
            self._seen[key] = is_authorized(self.user, dag_id, method)
        return self._seen[key]

    def require(self, dag_id: str, method: str = "GET") -> None:
        """403 unless the user may ``method`` the runs of ``dag_id``."""
        if not self.can(dag_id, method):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"Forbidden: user {self.user.get_name()!r} may not {_VERBS.get(method, method)} "
                                f"runs of DAG {dag_id!r}")


@cache
def _serializer() -> URLSafeTimedSerializer:
    from airflow.api_fastapi.auth.tokens import get_signing_key

    return URLSafeTimedSerializer(get_signing_key("api", "secret_key"), salt="reindex-ui-csrf")


def csrf_token(user: BaseUser) -> str:
    """A CSRF token for ``user``'s forms (signed user id + time)."""
    return _serializer().dumps(str(user.get_id()))


def uses_bearer(request: Request) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def check_csrf(request: Request, user: BaseUser, supplied: str | None) -> None:
    """403 unless a cookie-authenticated POST comes from this server with a valid token for ``user``."""
    if uses_bearer(request):
        return
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc not in _own_hosts(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden: cross-origin request (Origin header is not "
                                                       "this server)")
    supplied = supplied or request.headers.get(CSRF_HEADER)
    if not supplied:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"Forbidden: missing CSRF token (form field {CSRF_FIELD!r} "
                                                       f"or header {CSRF_HEADER}); reload the page and try again")
    try:
        owner = _serializer().loads(supplied, max_age=CSRF_MAX_AGE_SECONDS)
    except SignatureExpired:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden: the CSRF token is older than "
                                                       f"{CSRF_MAX_AGE_SECONDS // 3600} h; reload the page") from None
    except BadSignature:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden: invalid CSRF token; reload the page") from None
    if owner != str(user.get_id()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden: the CSRF token belongs to another user")


def _own_hosts(request: Request) -> set[str]:
    from airflow.configuration import conf

    hosts = {request.headers.get("host", ""), request.url.netloc}
    base_url = conf.get("api", "base_url", fallback="") or ""
    if base_url.startswith(("http://", "https://")):
        hosts.add(urlsplit(base_url).netloc)
    return {h for h in hosts if h}
