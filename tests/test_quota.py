"""What callers see of the hLimit bucket without a worker: ``GET …/quota``, the
``RateLimit-*`` headers of a 202, and intake's early 429 (real Redis; tokens are taken with
the same ``TokenBucket`` the worker uses)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from postroom.shared.ratelimit import TokenBucket
from tests.helpers import ADMIN, auth, queue_length

PERIOD = 3600
QUOTA = "/api/v1/solutions/acme/quota"
SEND = "/api/v1/solutions/acme/email"
MESSAGE = {"to": ["ann@example.com"], "text": "x"}

pytestmark = pytest.mark.settings(hlimit_period_s=PERIOD)


@pytest.fixture
def bucket(real_redis: redis.Redis) -> TokenBucket:
    """The bucket as a worker takes from it."""
    return TokenBucket(real_redis, PERIOD)


def make_solution(client: FlaskClient, **config: Any) -> str:
    r = client.post("/api/v1/solutions", json={"solution_id": "acme", **config},
                    headers=auth(ADMIN))
    assert r.status_code == 201, r.get_json()
    return str(r.get_json()["token"])


def quota(client: FlaskClient, token: str) -> dict[str, Any]:
    r = client.get(QUOTA, headers=auth(token))
    assert r.status_code == 200, r.get_json()
    body: dict[str, Any] = r.get_json()
    return body


def patch(client: FlaskClient, **config: Any) -> None:
    r = client.patch("/api/v1/solutions/acme/config", json=config, headers=auth(ADMIN))
    assert r.status_code == 200, r.get_json()


def test_quota_of_a_new_solution_is_the_whole_limit(client: FlaskClient) -> None:
    """A solution that sent nothing has hLimit tokens left and nothing to wait for."""
    token = make_solution(client, hLimit=5)

    body = quota(client, token)

    expected = {"hLimit": 5, "hLimit_policy": "reject", "remaining": 5, "retry_after": 0.0,
                "reset_after": 0.0}
    assert expected == body


def test_quota_counts_taken_tokens_and_says_when_one_frees(
    client: FlaskClient, bucket: TokenBucket
) -> None:
    """Each token a worker takes is one less; an empty bucket waits P/hLimit for the next."""
    token = make_solution(client, hLimit=4)

    seen = []
    for _ in range(4):
        bucket.take("acme", 4)
        seen.append(quota(client, token)["remaining"])
    empty = quota(client, token)

    assert [3, 2, 1, 0] == seen
    assert PERIOD / 4 == pytest.approx(empty["retry_after"], abs=2)
    assert PERIOD == pytest.approx(empty["reset_after"], abs=2)


def test_quota_follows_a_change_of_hlimit_at_once(
    client: FlaskClient, bucket: TokenBucket
) -> None:
    """2 of 4 used: raising hLimit to 10 shows 8 left, lowering it to 3 shows 1, and 0
    shows none, never (retry_after null)."""
    token = make_solution(client, hLimit=4)
    bucket.take("acme", 4)
    bucket.take("acme", 4)

    seen = []
    for limit in (10, 3, 0):
        patch(client, hLimit=limit)
        body = quota(client, token)
        seen.append((body["hLimit"], body["remaining"], body["retry_after"]))

    assert [(10, 8, 0.0), (3, 1, 0.0), (0, 0, None)] == seen


def test_quota_is_the_solutions_own(client: FlaskClient) -> None:
    """Without a token 401; another solution's token 404 (existence is not leaked)."""
    make_solution(client)
    r = client.post("/api/v1/solutions", json={"solution_id": "other"}, headers=auth(ADMIN))
    other = r.get_json()["token"]

    statuses = [client.get(QUOTA).status_code,
                client.get(QUOTA, headers=auth(other)).status_code]

    assert [401, 404] == statuses


def test_accepted_send_carries_ratelimit_headers(client: FlaskClient) -> None:
    """A 202 says the limit, what is left once this message has its token, when the bucket
    is full again, and the policy (capacity;w=period)."""
    token = make_solution(client, hLimit=10)

    r = client.post(SEND, json=MESSAGE, headers=auth(token))

    assert 202 == r.status_code
    headers = {name: r.headers.get(name) for name in
               ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy")}
    expected = {"RateLimit-Limit": "10", "RateLimit-Remaining": "9",
                "RateLimit-Reset": str(PERIOD // 10), "RateLimit-Policy": f"10;w={PERIOD}"}
    assert expected == headers


def test_a_tighter_request_hlimit_shows_in_the_headers(client: FlaskClient) -> None:
    """A request's own hLimit 2 under the solution's 10: the headers speak of the tighter."""
    token = make_solution(client, hLimit=10)

    r = client.post(SEND, json={**MESSAGE, "hLimit": 2}, headers=auth(token))

    assert (202, "2", "1") == (r.status_code, r.headers["RateLimit-Limit"],
                               r.headers["RateLimit-Remaining"])


def test_empty_bucket_under_reject_is_429_with_retry_after(
    client: FlaskClient, bucket: TokenBucket, real_redis: redis.Redis
) -> None:
    """Policy reject and no token: 429 RateLimited, Retry-After the whole seconds until one
    frees, hLimit in the body, and nothing enqueued."""
    token = make_solution(client, hLimit=3)
    for _ in range(3):
        bucket.take("acme", 3)

    r = client.post(SEND, json=MESSAGE, headers=auth(token))

    body = r.get_json()
    assert (429, "RateLimited", 3) == (r.status_code, body["type"], body["hLimit"])
    assert math.ceil(body["retry_after"]) == int(r.headers["Retry-After"])
    assert PERIOD / 3 == pytest.approx(int(r.headers["Retry-After"]), abs=2)
    assert 0 == queue_length(real_redis)


def test_empty_bucket_under_defer_is_accepted(
    client: FlaskClient, bucket: TokenBucket, real_redis: redis.Redis
) -> None:
    """Policy defer and no token: intake accepts (the worker holds the message in line)."""
    token = make_solution(client, hLimit=3, hLimit_policy="defer")
    for _ in range(3):
        bucket.take("acme", 3)

    r = client.post(SEND, json=MESSAGE, headers=auth(token))

    assert (202, "0") == (r.status_code, r.headers["RateLimit-Remaining"])
    assert 1 == queue_length(real_redis)


@pytest.mark.parametrize("policy", ["reject", "defer"])
@pytest.mark.parametrize(("solution_limit", "request_limit"), [(0, None), (10, 0)])
def test_hlimit_zero_is_429_whatever_the_policy(
    client: FlaskClient, real_redis: redis.Redis, policy: str, solution_limit: int,
    request_limit: int | None,
) -> None:
    """hLimit 0 (the solution's or the request's) stops sending: 429 RateLimited under
    either policy, with no Retry-After (no token will ever free) and nothing enqueued."""
    token = make_solution(client, hLimit=solution_limit, hLimit_policy=policy)
    body = MESSAGE if request_limit is None else {**MESSAGE, "hLimit": request_limit}

    r = client.post(SEND, json=body, headers=auth(token))

    answer = (r.status_code, r.get_json()["type"], r.get_json()["retry_after"])
    assert (429, "RateLimited", None) == answer
    assert None is r.headers.get("Retry-After")
    assert 0 == queue_length(real_redis)
