import sys

from fastmae.cli import main

sys.exit(main())
