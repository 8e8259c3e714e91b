"""The job secret: loading it, signed store entries, and the rendezvous checks on a real store."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from idla.elastic.auth import StoreAuth, entry_mac, job_secret_from_env, seal, unseal
from idla.elastic.rendezvous import OpenJobWarning, Rendezvous, parse_member_list
from idla.errors import ConfigError

SECRET = b"0123456789abcdef-secret"
KEY = "idla-elastic/local/0/g1/alive/2"


def test_a_sealed_entry_opens_with_its_secret_only() -> None:
    raw = seal(SECRET, KEY, 2, 1, {"step": 40})

    entry, _ = unseal(SECRET, KEY, raw)
    assert entry is not None and (entry.member, entry.counter, entry.value) == (2, 1, {"step": 40})
    assert unseal(b"another-secret-of-16+", KEY, raw) == (
        None, "signed with another secret, or altered")
    assert unseal(SECRET, KEY.replace("alive/2", "alive/3"), raw)[0] is None  # moved key
    assert unseal(SECRET, KEY, seal(None, KEY, 2, 1, {"step": 40})) == (None, "unsigned")


@pytest.mark.parametrize("field, value", [("v", '{"step":1000}'), ("m", 0), ("n", 7)])
def test_an_altered_field_breaks_the_mac(field: str, value: object) -> None:
    envelope = json.loads(seal(SECRET, KEY, 2, 1, {"step": 40}))
    envelope[field] = value

    assert unseal(SECRET, KEY, json.dumps(envelope))[0] is None


@pytest.mark.parametrize("raw", [
    b"", b"1", b"\xff", b'{"v": 1}', b'{"v":"x","m":1,"n":1,"mac":""}', b'{"v":"1","m":true}',
])
def test_malformed_entries_are_refused_without_a_secret_too(raw: bytes) -> None:
    assert unseal(None, KEY, raw)[0] is None


def test_without_a_secret_any_well_formed_entry_is_accepted() -> None:
    entry, _ = unseal(None, KEY, seal(SECRET, KEY, 2, 1, 3.5))

    assert entry is not None and entry.value == 3.5


def test_the_mac_fields_cannot_run_into_each_other() -> None:
    assert entry_mac(SECRET, "a", 12, 3, "x") != entry_mac(SECRET, "a", 1, 23, "x")


def test_refused_entries_are_logged_once_per_kind_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    auth = StoreAuth(SECRET)
    with caplog.at_level(logging.WARNING, logger="idla.elastic"):
        for member in (3, 4, 4):
            key = f"p/join/{member}"
            assert auth.unseal(key, seal(None, key, member, 0, {})) is None
        key = "p/hb/1"
        assert auth.unseal(key, seal(SECRET, key, 2, 0, 1.0), member=1) is None

    assert len(caplog.records) == 2  # one for join/N, one for hb/N
    assert set(auth.refused) == {"p/join/3", "p/join/4", "p/hb/1"}
    assert auth.refused["p/hb/1"] == "written by member 2, not 1"


def test_the_secret_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  file-secret-0123456789\n")

    assert job_secret_from_env({}) is None
    assert job_secret_from_env({"IDLA_JOB_SECRET": "env-secret-0123456789"}) == (
        b"env-secret-0123456789")
    assert job_secret_from_env({"IDLA_JOB_SECRET_FILE": str(path)}) == b"file-secret-0123456789"


@pytest.mark.parametrize("env, message", [
    ({"IDLA_JOB_SECRET_FILE": "/nonexistent/secret"}, "cannot read the job secret"),
    ({"IDLA_JOB_SECRET": ""}, "is empty"),
    ({"IDLA_JOB_SECRET": "short"}, "has 5 characters"),
    ({"IDLA_JOB_SECRET": "a" * 20, "IDLA_JOB_SECRET_FILE": "x"}, "not both"),
])
def test_a_bad_secret_is_one_clear_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        job_secret_from_env(env)

    assert "\n" not in str(caught.value)


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("\n")

    with pytest.raises(ConfigError, match=f"IDLA_JOB_SECRET_FILE={path}: the job secret is empty"):
        job_secret_from_env({"IDLA_JOB_SECRET_FILE": str(path)})


def test_member_lists_are_checked() -> None:
    good = {"members": [0, 1, 3], "joiners_seen": 1, "sources": [0, 1], "step_limit": 45}

    assert parse_member_list(good) == ([0, 1, 3], 1, [0, 1], 45)
    assert parse_member_list({**good, "sources": [0, 7]}) is None  # a source outside the group
    assert parse_member_list({**good, "members": "0,1"}) is None
    assert parse_member_list({**good, "step_limit": True}) is None


def _rendezvous(tmp_path: Path, secret: bytes | None, name: str = "store") -> Rendezvous:
    return Rendezvous(f"file:{tmp_path / name}", 0, 1, secret=secret)


def test_an_open_job_warns_once_at_member_0(tmp_path: Path) -> None:
    with pytest.warns(OpenJobWarning, match="anyone who can reach its store"):
        rdzv = _rendezvous(tmp_path, None)
    rdzv.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenJobWarning)
        _rendezvous(tmp_path, SECRET, "store-with-secret").close()


def test_only_a_signed_join_request_is_answered(tmp_path: Path) -> None:
    rdzv = _rendezvous(tmp_path, SECRET)
    try:
        rdzv.store.add(rdzv.key("join/count"), 2)  # two requests: ids 1 and 2
        for member, secret in ((1, None), (2, b"a-wrong-secret-of-16+")):
            key = rdzv.key(f"join/{member}")
            rdzv.store.set(key, seal(secret, key, member, 0, {"join": member}))
        assert not rdzv.join_pending()
        assert set(rdzv.auth.refused) == {rdzv.key("join/1"), rdzv.key("join/2")}

        key = rdzv.key("join/2")
        rdzv.store.set(key, seal(SECRET, key, 2, 0, {"join": 2}))
        assert rdzv.join_pending()
    finally:
        rdzv.close()


def test_the_step_limit_follows_the_signed_commit_records(tmp_path: Path) -> None:
    rdzv = _rendezvous(tmp_path, SECRET)
    try:
        assert rdzv._step_limit() == 0  # no record: generation 0 starts at step 0
        rdzv.record_commit(40)
        forged = rdzv.key("g0/commit/0")
        assert rdzv._step_limit() == 45
        rdzv.store.set(forged, seal(None, forged, 0, 0, {"step": 10**6}))
        assert rdzv._step_limit() == 0  # the forged record is ignored, not believed
    finally:
        rdzv.close()
