import sys

from contra_ray.data.cli import main

sys.exit(main())
