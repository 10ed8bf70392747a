"""The CUDA machinery: a step launched before its input arrives (ahead) and released by a
device-side flag (gate), and received tensors loaded to the device in one transfer (load)."""
