"""Model architectures, one file per family; `registry` maps config names to classes."""
