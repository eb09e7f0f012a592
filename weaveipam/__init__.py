"""weaveipam: a Weave-Net-style distributed IP address manager."""

__version__ = "0.1.0"
