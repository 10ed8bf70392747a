"""One shard of layers on one node: its mailbox, the actor that runs forward passes, and the
compute thread MLX work runs on."""
