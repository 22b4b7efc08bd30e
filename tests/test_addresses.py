"""Plain ASCII addresses take a shorter path (``shared/schemas/addresses.py``: the domain's
verdict kept, the local part judged by email-validator's own rule): it must give exactly
the answer of the full validation, for every address it takes, and leave every other
address to it."""

from __future__ import annotations

import random

import pytest
from marshmallow import ValidationError

from postroom.shared.schemas import addresses
from postroom.shared.schemas.addresses import normalize_address

LOCALS = [
    "a", "A.b", "x+tag", "o'neil", "a_b", "x-y", "{weird}|~", "1234",
    "a..b", ".a", "a.", "", "a b", '"quoted"', "é", "a@b",
    "Postmaster", "ABUSE", "NoReply", "x" * 64, "x" * 65, "x" * 200,
]
DOMAINS = [
    "example.com", "EXAMPLE.Com", "ex-ample.co.uk", "a.b", "mail.example.museum",
    "-bad.com", "bad-.com", "a..b.com", ".example.com", "example.com.", "com",
    "localhost", "x.local", "x.invalid", "x.test", "x.onion", "x.arpa", "example",
    "123.456", "a.123", "1.2.3.4", "under_score.com", "xn--bcher-kva.example",
    "XN--BCHER-KVA.example", "xn--zz.com", "xn--80ak6aa92e.com", "bücher.example",
    "a" * 63 + ".com", "a" * 64 + ".com", ".".join(["abcdefghi"] * 25) + ".com",
    "[127.0.0.1]",
]


def full(value: str) -> str | None:
    """What the full validation answers: the address, or None for an error."""
    try:
        return addresses._normalize(value, check_dns=False)
    except ValidationError:
        return None


def check(value: str) -> None:
    short = addresses._simple(value)
    if short is not None:
        assert short == full(value), value


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_short_path_agrees_with_the_full_validation(domain: str) -> None:
    """Every local part with every domain, including each limit and special name."""
    for local in LOCALS:
        check(f"{local}@{domain}")


def test_the_short_path_agrees_on_random_addresses() -> None:
    """Random addresses built from the characters that matter (dots, hyphens, case, the
    atom specials, a few that are never allowed) around every boundary of length."""
    rng = random.Random(20261124)
    alphabet = "aZ9.-_+!#'{}~@ é\t"
    taken = 0
    for _ in range(3000):
        local = "".join(rng.choice(alphabet[:10]) for _ in range(rng.randint(0, 70)))
        labels = [
            "".join(rng.choice("abZ09-") for _ in range(rng.randint(0, 66)))
            for _ in range(rng.randint(1, 5))
        ]
        value = f"{local}@{'.'.join(labels)}"
        if rng.random() < 0.05:
            value = value.replace("a", rng.choice(alphabet), 1)
        check(value)
        taken += addresses._simple(value) is not None
    assert taken > 150  # the short path was in fact taken


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Someone@Example.COM", "Someone@example.com"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        ("PostMaster@Example.com", "postmaster@example.com"),  # the full path lower-cases
        ("a@xn--bcher-kva.example", "a@xn--bcher-kva.example"),  # the full path: an IDN
        ("a@bücher.example", "a@xn--bcher-kva.example"),
    ],
)
def test_normalized_forms(value: str, expected: str) -> None:
    assert expected == normalize_address(value)


@pytest.mark.parametrize(
    "value, message",
    [
        ("a..b@example.com", "period"),
        ("a@x.invalid", "special-use"),
        ("a@example", "period"),
        ("x" * 250 + "@example.com", "too long"),
        ("a@-bad.com", "hyphen"),
    ],
)
def test_refusals_keep_email_validators_words(value: str, message: str) -> None:
    """An address the short path does not take is judged in full, with its message."""
    with pytest.raises(ValidationError) as info:
        normalize_address(value)
    assert message in str(info.value).lower()


def test_the_domain_verdict_is_kept_once_per_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many addresses at one domain cost email-validator one call."""
    addresses._plain_domain.cache_clear()
    addresses._normalize_cached.cache_clear()
    calls = []
    validated = addresses._validated

    def counting(value: str, *, check_dns: bool) -> object:
        calls.append(value)
        return validated(value, check_dns=check_dns)

    monkeypatch.setattr(addresses, "_validated", counting)
    for n in range(50):
        assert f"user{n}@kept.example.com" == normalize_address(f"user{n}@Kept.Example.com")
    assert ["a@kept.example.com"] == calls
