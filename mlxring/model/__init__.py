"""The model on one node: its family adapter (families), the checkpoint on disk or on the hub
(source), what each checkpoint tensor belongs to (checkpoint), a shard of its layers (sharded),
and random-weight test models (make)."""
