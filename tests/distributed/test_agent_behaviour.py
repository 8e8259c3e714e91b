"""The agent under real throttling, and its replica check."""

from __future__ import annotations

import pytest

from idla.emulate.cgroup import cgroups_available
from idla.errors import IdlaError
from idla.runtime.launch import launch_local
from tests.distributed import workers


def test_diverged_replicas_stop_with_a_clear_error() -> None:
    with pytest.raises(IdlaError, match=r"replicas diverged by step 0: parameters on rank\(s\) 1"
                       ) as raised:
        launch_local(workers.diverge_then_check, (), 2)

    # the differing parameter is named, and the likely causes listed
    assert "differing: 'bias' (rank 1)." in str(raised.value)
    assert "Likely causes:" in str(raised.value)


@pytest.mark.cgroup
@pytest.mark.skipif(not cgroups_available(), reason="needs a writable cgroup v1 cpu controller")
def test_a_throttled_worker_is_discovered_and_given_less() -> None:
    # Prepare: rank 1 really gets a quarter of rank 0's CPU; the agent is not told
    speeds = [1.0, 0.25]

    # Execute
    result = launch_local(workers.heterogeneous_shares, (12,), 2, speeds, base_cores=0.5)[0]

    # Assert
    fast, slow = result["shares"]
    assert fast + slow == 256
    assert slow < 0.6 * fast
    assert result["report"]["workers"][1]["compute_s"] > 0
