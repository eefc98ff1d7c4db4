"""A run's bookkeeping: where its files live, what it recorded, how it writes and reports.

- `layout`: the run directory's layout, written once.
- `manifest`: `manifest.json`, every artifact with its hash and the stage that made it.
- `io`: atomic file and directory writes.
- `runlock`: one run per run dir.
- `errors`: the project's one-line errors.
- `progress`: progress bars on a terminal only.
- `summary`: what a run prints at the end.
"""
