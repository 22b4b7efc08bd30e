"""Bearer tokens: the admin token may do everything, a solution's token only its own routes.

Another solution's resources answer 404 (their existence is not leaked); a solution's
token on an admin-only route answers 403.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import request

from postroom.shared.crypto import tokens_equal
from postroom.shared.errors import Forbidden, NotFound, Unauthorized
from postroom.shared.solutions import Solution, SolutionStore


@dataclass(frozen=True)
class Principal:
    admin: bool
    solution_id: str | None = None


def bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    return token.strip()


def authenticate(admin_token: str, solutions: SolutionStore) -> Principal:
    token = bearer_token()
    if admin_token and tokens_equal(token, admin_token):
        return Principal(admin=True)
    sid = solutions.by_token(token)
    if sid is None:
        raise Unauthorized("invalid token")
    return Principal(admin=False, solution_id=sid)


def authorize(
    admin_token: str, solutions: SolutionStore, sid: str
) -> tuple[Principal, Solution]:
    """The caller, allowed on solution ``sid``'s routes, and that solution, read together
    (one round trip). 401 for a bad token comes before 404 for an unknown solution."""
    token = bearer_token()
    admin = is_admin(token, admin_token)
    try:
        owner, solution = solutions.owner_and_get(None if admin else token, sid)
    except NotFound:
        owner, solution = (None if admin else solutions.by_token(token)), None
    return allowed(admin, owner, solution, sid)


def is_admin(token: str, admin_token: str) -> bool:
    return bool(admin_token) and tokens_equal(token, admin_token)


def allowed(
    admin: bool, owner: str | None, solution: Solution | None, sid: str
) -> tuple[Principal, Solution]:
    """The verdict on what was read: the admin token, or the solution whose token it is
    (``owner``), on solution ``sid`` (None: it does not exist). 401, then 404."""
    if not admin and owner is None:
        raise Unauthorized("invalid token")
    principal = Principal(admin=admin, solution_id=owner)
    require_solution(principal, sid)
    if solution is None:
        raise NotFound(f"solution {sid!r} not found")
    return principal, solution


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden("this route needs the admin token")


def require_solution(principal: Principal, sid: str) -> None:
    if not principal.admin and principal.solution_id != sid:
        raise NotFound(f"solution {sid!r} not found")
