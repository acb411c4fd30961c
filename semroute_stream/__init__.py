"""semroute-stream: a streaming semantic router (filled in as the modules land)."""
