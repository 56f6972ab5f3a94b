"""Stage *save/load*: atomic saves, integrity checks, artifact recognition, and rebuilding packed modules."""
