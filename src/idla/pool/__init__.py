"""The device-pool agent: several jobs with priorities on one pool of unequal devices.

- `idla.pool.model` — the vocabulary every part shares: devices, jobs as the policy sees them,
  allocations, and the performance-model interface.
- `idla.pool.policy` — `allocate(jobs, devices, models, current)`, a pure function.
- the simulator, the job specs, the SQLite store, the HTTP control API, actuation and the status
  page each live in their own module here.
"""
