import sys

from slmops.cli import main

sys.exit(main())
