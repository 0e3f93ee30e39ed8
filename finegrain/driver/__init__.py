"""The driver above the passes: ``compile`` / ``compile_frontier`` (``api``) and the pipeline,
named stages of passes (``pipeline``)."""
