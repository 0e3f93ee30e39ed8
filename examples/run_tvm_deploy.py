"""Run a finegrain TVM deployment with only the TVM runtime and numpy (no finegrain, no torch).

    python examples/run_tvm_deploy.py deploy/ 504 3458 314 1029   # token ids -> next-token id
"""
import json
import os
import sys

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))  # TVM's default is half the cores
import tvm.runtime  # noqa: E402

path, ids = sys.argv[1], np.array([[int(t) for t in sys.argv[2:]]], dtype="int64")
manifest = json.load(open(f"{path}/manifest.json"))
vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(f"{path}/model.so"), tvm.runtime.cpu())
params = tvm.runtime.load_param_dict_from_file(f"{path}/params.bin")
fn = "decode" if ids.shape[1] == 1 else "prefill"  # manifest["functions"]: the sequence lengths each takes
logits = vm[fn](tvm.runtime.tensor(ids), *[params[n] for n in manifest["params"]]).numpy()
print(json.dumps({"function": fn, "logits_shape": list(logits.shape), "next_token": int(logits[0, -1].argmax()),
                  "last_logits_head": [round(float(v), 4) for v in logits[0, -1, :4]]}))
