"""Where the reliability tests (``tests/reliability``) import the server launcher from.

The launcher itself is :mod:`bench._server`, shared with the CPU bench and the stress burst.
"""

from bench._server import ROOT, ServerProcess, free_port

__all__ = ["ROOT", "ServerProcess", "free_port"]
