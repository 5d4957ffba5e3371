"""`python -m bench [--only NAME,...] [--device cuda --size xl] [--quick]`: every benchmark, tables, JSON and plots."""

from __future__ import annotations

if __name__ == "__main__":  # a spawned worker process imports this module too
    from .runner import main

    main()
