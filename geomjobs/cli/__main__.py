"""``python -m geomjobs.cli``: what submitted Ray jobs and the tests run."""
import sys

from geomjobs.cli import main

sys.exit(main())
