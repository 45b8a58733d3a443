"""Session storage: the memory tier (this package) and the LMDB disk tier."""
