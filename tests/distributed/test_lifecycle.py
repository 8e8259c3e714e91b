"""A script that forgets ``agent.close()`` is warned at exit; one that closes is not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import torch
from torch import nn
import idla

torch.set_num_threads(1)
model = nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = [torch.randn(16, 4), torch.randn(16, 2)]
agent = idla.Agent(model, optimizer, data, global_batch_size=8)
for x, y in agent.batches(0):
    agent.backward(nn.functional.mse_loss(model(x), y))
    optimizer.step()
    break
{ending}
print("done")
"""


@pytest.mark.parametrize(("ending", "warned"), [("", True), ("agent.close()", False),
                                                ("del agent", True)])
def test_exit_without_close_warns(ending: str, warned: bool) -> None:
    # Prepare: a one-process run, as a user's script runs it
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}

    # Execute
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(ending=ending)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)

    # Assert
    assert done.stdout.strip() == "done"
    assert ("AgentNotClosedWarning" in done.stderr) == warned, done.stderr
    assert done.stderr.count("was never closed") == int(warned)
