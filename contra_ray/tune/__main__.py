import sys

from contra_ray.tune.sweep import main

sys.exit(main())
