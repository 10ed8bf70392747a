"""Moving frames between processes: one TCP connection (conn), a reconnecting link between two
nodes with its handshake (link), finding peers on the LAN (discovery), and the owner of
discovery's background tasks (tasks)."""
