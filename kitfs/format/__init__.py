"""Pure parsing of everything kitfs reads: bytes in, values out; no I/O, no clock, no trio."""
