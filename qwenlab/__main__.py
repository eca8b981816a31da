import sys

from qwenlab.cli import main

sys.exit(main())
