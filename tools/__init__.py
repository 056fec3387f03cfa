"""Developer tooling run on the host (not part of the device runtime or the export package; not installed).

Imported by bench/ and tests/ from the repository root (both put it on ``sys.path``).
"""
