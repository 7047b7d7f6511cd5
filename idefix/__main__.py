import sys

from idefix.cli import main

sys.exit(main())
