"""What the agent sees: sockets and their processes, connection events, denied packets, flows."""
