"""``python -m reindex.emulators.embedding_service``: see ``reindex.emulators.embedding_service.cli``."""

from reindex.emulators.embedding_service.cli import main

if __name__ == "__main__":
    main()
