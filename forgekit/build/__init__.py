"""Building: keys, the compute path, shards, the object store, staging, publishing, gc."""
