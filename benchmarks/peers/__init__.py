"""The step bodies as each system wants them: Streamflow Workers, Celery tasks, DBOS
workflows. Every one calls `benchmarks.workloads.body.run_step`."""
