"""TVM backend (issue #7): the quantized FX graph lowered to Relax (``lower.py``) with low-bit TIR
kernels (``kernels/``), CPU schedules for the rest (``schedules.py``, optional MetaSchedule in
``tune.py``), compiled ahead of time into a deployment directory (``deploy.py``).

TVM's CPU thread pool starts, unless told otherwise, with half the hardware threads (it assumes
hyper-threading); on a 2-core machine without it that is one thread. ``TVM_NUM_THREADS`` is set
here to the cores this process may use, before the pool starts, unless the user set it.
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
