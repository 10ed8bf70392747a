"""The ring as a whole: the node runtime, who is in the ring and which layers each holds (plan),
one frozen view of the ring for status and metrics (snapshot), this machine's facts (machine) and
per-hop timing (hoptime)."""
