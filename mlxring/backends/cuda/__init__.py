"""The CUDA launch-ahead path: a step built before its input arrives (ahead) and released by a
device-side flag (gate)."""
