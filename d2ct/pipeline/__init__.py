"""The whole method as resumable stages (tools/run_pipeline.py)."""
