"""`python -m cogvlm_ray.loadgen ...` entry point."""

from cogvlm_ray.loadgen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
