import sys

from viddet.cli import main

sys.exit(main())
