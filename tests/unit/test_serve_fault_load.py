"""The serving-faults bench's load process gets its bearer token whatever the token looks like."""

from __future__ import annotations

from idla.bench.serve_fault_load import SteadyLoad
from idla.runtime.launch import free_port


def test_a_token_that_starts_with_a_dash_reaches_the_load_client() -> None:
    # secrets.token_urlsafe starts with "-" one time in 64: as "--token -x" argparse took it
    # for an option and the load process exited ("the load generator did not start")
    port = free_port()  # nothing listens there: every request goes unanswered

    with SteadyLoad(port, "-looks-like-an-option", 5.0, 1, 2, seed=0) as load:
        records = load.stop()

    assert all(record["status"] == 0 for record in records)
