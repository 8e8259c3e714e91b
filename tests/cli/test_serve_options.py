"""`idla serve --load-timeout`: parsed into the router's config, refused when not positive."""

from __future__ import annotations

import contextlib
import io

import pytest

from idla.cli.app import build_parser, main
from idla.cli.serve import _router_config


def test_load_timeout_reaches_the_router_config() -> None:
    args = build_parser().parse_args(["serve", "--model", "m", "--load-timeout", "7.5"])
    assert _router_config(args, args.policy, 1).load_timeout_s == 7.5
    default = build_parser().parse_args(["serve", "--model", "m"])
    assert _router_config(default, default.policy, 1).load_timeout_s == 120.0


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_a_load_timeout_that_is_not_a_positive_number_is_refused(value: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        main(["serve", "--model", "m", "--load-timeout", value])
    assert stop.value.code == 2
    assert "--load-timeout" in err.getvalue() and "Traceback" not in err.getvalue()


def test_latency_target_reaches_the_router_config() -> None:
    args = build_parser().parse_args(["serve", "--model", "m", "--latency-target-ms", "250"])
    assert _router_config(args, args.policy, 1).latency_target_s == 0.25
    default = build_parser().parse_args(["serve", "--model", "m"])
    assert _router_config(default, default.policy, 1).latency_target_s is None


@pytest.mark.parametrize(("argv", "option"), [
    (["--arrivals", "pareto"], "--arrivals"), (["--policies", "random"], "--policies"),
    (["--burst-cv", "0"], "--burst-cv"), (["--loads", "80,x"], "--loads"),
])
def test_bench_serve_refuses_bad_options_in_one_line(argv: list[str], option: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(["bench", "serve", *argv])
        except SystemExit as stop:  # argparse's own checks
            code = int(stop.code or 0)
    assert code == 2
    assert option in err.getvalue() and "Traceback" not in err.getvalue()
