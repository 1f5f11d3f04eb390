import sys

from ewtune.cli import main

sys.exit(main())
