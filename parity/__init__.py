"""moe-parity harness: config, canonical weights, float64 reference, comparison and CLI.

``import parity`` stays cheap: torch and JAX are imported only by the harness when it runs.
"""

from parity.config import MoEConfig

__all__ = ["MoEConfig"]
