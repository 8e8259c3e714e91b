"""idla: an intelligent deep-learning agent for heterogeneous devices."""
