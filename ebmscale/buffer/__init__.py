"""Replay buffers: the logic is a plain NumPy class (``replay``); ``client`` gives the trainer one
interface over two hosts: in-process (``LocalBuffer``) or a global buffer sharded across Ray actors
(``ray_host.RayBuffer``, imported only when that backend is chosen). No torch is imported here, so
Ray actors can import this package."""
from ebmscale.buffer.client import LocalBuffer, build_buffer
from ebmscale.buffer.replay import ReplayBuffer

__all__ = ["LocalBuffer", "ReplayBuffer", "build_buffer"]
