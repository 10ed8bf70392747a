"""The head's request lifecycle: prefill and decode around the ring, tokens out."""
