"""Moving frames between processes: one TCP connection (conn), a reconnecting link between two
nodes with its handshake (link), and finding peers on the LAN (discovery)."""
