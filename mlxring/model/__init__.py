"""The model on one node: its family adapter (families), the checkpoint on disk or on the hub
(source), a shard of its layers (sharded), and random-weight test models (make)."""
