"""The feature store: a Zarr v3 hierarchy of pooled U-Net features (layout in `layout.py`).

`cache` depends on nothing else in the project, so a store can be read with this package alone.
"""

from cache.errors import IncompleteStoreError, StoreError, StoreLockedError, StoreMismatchError
from cache.reader import FeatureStore
from cache.writer import FeatureStoreWriter

__all__ = [
    "FeatureStore",
    "FeatureStoreWriter",
    "IncompleteStoreError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
]
