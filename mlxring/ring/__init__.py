"""The ring as a whole. `runtime` is one node process (its tasks in one group: mlxring/tasks.py);
`routing` says where each message goes next; `membership` decides, as pure transitions, who is in
the ring and which layers each holds (`plan`), and `replan` carries the decision out (`loading`);
`monitor` watches a probe go round; `directory` knows where every node is; `snapshot` is one
frozen view of the ring for status and metrics; `machine` is this machine's facts, `hoptime`
per-hop timing, `poll` the busy-poll loop."""
