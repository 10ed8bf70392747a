"""The head's request lifecycle (lifecycle: prefill and decode around the ring, tokens out) and
the text side of generation (text: detokenizing and stop strings)."""
