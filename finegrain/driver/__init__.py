"""The driver above the passes: ``compile`` / ``compile_frontier`` / ``compile_joint`` (``api``), KVTuner's
search (``kv_tune``), block-by-block compilation (``stream``) and the pipeline,
named stages of passes (``pipeline``)."""
