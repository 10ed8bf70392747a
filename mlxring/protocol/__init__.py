"""What travels between nodes: the message types (messages) and their frame encoding (codec)."""
