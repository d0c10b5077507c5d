from contra_ray.evaluate.cli import main

main()
