import sys

from reindex.cli import main

sys.exit(main())
