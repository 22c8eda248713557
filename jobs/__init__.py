"""The Ray jobs, one package each (`python -m jobs.<name>`), and `jobs.common`, the plumbing they share.

A job package imports `model` and `jobs.common` only (`jobs.tune` also the public API of
`jobs.pretrain`); `jobs.common` imports no job. pyproject.toml's import-linter contracts enforce
it; ARCHITECTURE.md at the repository root draws the rooms.
"""
