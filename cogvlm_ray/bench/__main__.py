"""`python -m cogvlm_ray.bench ...` entry point."""

from cogvlm_ray.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
