import sys

from saelora.cli import main

sys.exit(main())
