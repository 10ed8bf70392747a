"""The ring as a whole: the node runtime, who is in the ring and which layers each holds (plan),
this machine's facts (machine) and per-hop timing (hoptime)."""
