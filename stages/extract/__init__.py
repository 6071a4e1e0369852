"""The extraction stage (U-Net features into the store) and the raw-pixel baseline.

`stages.extract.noise` is the documented way to recompute the noise of any stored feature.
"""

from stages.extract.noising import noise

__all__ = ["noise"]
