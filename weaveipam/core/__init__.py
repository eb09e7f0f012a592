"""The sans-IO engine: pure state machines, no sockets, no clock, no global randomness."""
