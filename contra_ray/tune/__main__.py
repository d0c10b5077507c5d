import sys

from contra_ray.tune.cli import main

sys.exit(main())
