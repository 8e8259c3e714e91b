"""Property tests: any text given to a CLI parser yields a value or a clear ConfigError, never
another exception (which the CLI would show as a traceback)."""

from __future__ import annotations

import contextlib
import io

from hypothesis import given, settings
from hypothesis import strategies as st

from idla.cli.app import main
from idla.compress import parse_codec
from idla.emulate.cgroup import parse_speeds
from idla.emulate.netns import parse_rate
from idla.errors import ConfigError
from idla.sync.modes import parse_sync

# Text that looks like what people type: names, numbers, separators, and some noise.
TOKENS = st.sampled_from(["topk", "randk", "sign", "fp16", "none", "powersgd", "auto", "local",
                          "diloco", "async", "allreduce", "mbit", "kbit", "gbit", "mbps"])
NUMBERS = st.one_of(st.integers(-5, 10**6).map(str), st.floats(allow_nan=True).map(str))
PIECES = st.one_of(TOKENS, NUMBERS, st.sampled_from([":", ",", ".", " ", "-", "e"]),
                   st.text(max_size=4))
INPUTS = st.lists(PIECES, max_size=5).map("".join)


@settings(max_examples=300, deadline=None)
@given(INPUTS)
def test_codec_specs_parse_or_fail_clearly(text: str) -> None:
    try:
        codec = parse_codec(text)
    except ConfigError as error:
        assert str(error)
    else:
        assert parse_codec(codec.name) == codec


@settings(max_examples=300, deadline=None)
@given(INPUTS)
def test_sync_modes_parse_or_fail_clearly(text: str) -> None:
    try:
        spec = parse_sync(text)
    except ConfigError as error:
        assert str(error)
    else:
        assert parse_sync(spec.describe()) == spec


@settings(max_examples=300, deadline=None)
@given(INPUTS)
def test_rates_parse_or_fail_clearly(text: str) -> None:
    try:
        rate = parse_rate(text)
    except ConfigError as error:
        assert str(error)
    else:
        assert rate > 0


@settings(max_examples=300, deadline=None)
@given(INPUTS)
def test_speed_lists_parse_or_fail_clearly(text: str) -> None:
    try:
        speeds = parse_speeds(text)
    except ConfigError as error:
        assert str(error)
    else:
        assert speeds and all(s > 0 for s in speeds)


ARGV_TEXT = INPUTS.map(lambda text: text.replace("\x00", ""))  # argv cannot hold a NUL


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["--workers", "--compress", "--sync", "--global-batch",
                                 "--emulate-speeds", "--lr", "--epochs"]), max_size=2),
       st.lists(ARGV_TEXT, min_size=2, max_size=2))
def test_the_train_command_never_shows_a_traceback(options: list[str], values: list[str]) -> None:
    pairs = zip(options, values[: len(options)], strict=True)
    args = [part for option, value in pairs for part in (option, value)]
    args += ["--epochs", "0"]  # an invalid setting last: the command must stop before training

    # Execute: in this process, so an exception escaping `main` (a traceback) fails the test
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["train", *args])
        except SystemExit as stop:  # argparse's own errors
            code = stop.code

    assert code == 2
    assert err.getvalue().startswith(("idla: error:", "usage: idla"))
