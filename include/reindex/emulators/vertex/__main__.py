"""``python -m reindex.emulators.vertex``: see ``reindex.emulators.vertex.cli``."""

from reindex.emulators.vertex.cli import main

if __name__ == "__main__":
    main()
