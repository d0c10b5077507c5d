import sys

from contra_ray.distill.cli import main

sys.exit(main())
