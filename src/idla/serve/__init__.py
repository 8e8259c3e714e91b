"""Serving: the model format, workers with dynamic batching, a capacity-aware router behind
FastAPI, and offline batch inference over heterogeneous workers."""
