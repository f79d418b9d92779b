"""Replay buffers: the logic is a plain NumPy class (``replay``); Ray hosting comes on top."""
from ebmscale.buffer.replay import ReplayBuffer

__all__ = ["ReplayBuffer"]
