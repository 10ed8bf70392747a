"""Accelerator-specific machinery, chosen once at start; the Metal/CPU path needs none of it."""
