"""Compute: the actor that hosts a model variant, the techniques, workloads and metrics."""
