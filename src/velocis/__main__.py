import sys

from velocis.cli import main

sys.exit(main())
