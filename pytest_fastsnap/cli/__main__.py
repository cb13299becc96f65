import sys

from pytest_fastsnap.cli import main

sys.exit(main())
