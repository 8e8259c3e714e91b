"""Federated learning: strategies (selection, robust aggregation, trust), a fast local
simulation without Ray, and an adapter that runs the same strategy inside Flower."""
