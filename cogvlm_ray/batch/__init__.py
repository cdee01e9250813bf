"""Offline batch inference on Ray Data with the server's preprocessor and engine.

    inputs.py         folder/glob of images, OpenAI Batch JSONL, Parquet/CSV -> request rows
    resume.py         ids already answered in the output are skipped (resume by id)
    preprocessing.py  CPU tasks: request rows -> the ingress's checks + Preprocessor.prepare
    generation.py     engine actors (autoscaling pool, one continuous-batching Engine each)
    outputs.py        JSONL (plain / OpenAI Batch output) or Parquet, written as results arrive
    pipeline.py       the Ray Data pipeline and `run(options)`
    schema.py         the Arrow row layouts between the stages (every row keeps its id)
    options.py        BatchOptions (the server's AppArgs + input, output, sampling, sizing)
    cli.py            `python -m cogvlm_ray.batch INPUT --output OUT ...`

Docs: docs/batch.md.
"""
