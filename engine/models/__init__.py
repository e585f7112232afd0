"""Model implementations (one file per architecture family) and checkpoint loading."""
