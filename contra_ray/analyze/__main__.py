import sys

from contra_ray.analyze.cli import main

sys.exit(main())
