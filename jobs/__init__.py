"""Ray jobs (`python -m jobs.<name>`) and their shared plumbing: config, storage, tracking."""
