import sys

from contra_ray.data.sources import main

sys.exit(main())
