"""`python -m cogvlm_ray.batch`: see cli.py."""

from cogvlm_ray.batch.cli import main

raise SystemExit(main())
