import sys

from contra_ray.export.cli import main

sys.exit(main())
