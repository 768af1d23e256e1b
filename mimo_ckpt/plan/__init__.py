"""Planning: which rank writes which bytes where, which stored bytes fill which box. Pure functions of their inputs."""
