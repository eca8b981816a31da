"""`python -m qwenlab.report ...`: the same as `qwenlab report ...`."""
import sys

from qwenlab.errors import standalone_main
from qwenlab.report.run import register

sys.exit(standalone_main("report", register))
