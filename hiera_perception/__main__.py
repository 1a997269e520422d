import sys

from hiera_perception.cli import main

sys.exit(main())
