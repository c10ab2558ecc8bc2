"""The training script as one process of a distributed launch, recording what this rank did.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_run.py RECORD_DIR <script arguments>

Each rank writes `RECORD_DIR/rank<k>.json`: the world size it saw, the label rows of every training forward pass,
whether the transfer ran in it, the dtype of the CTC head's output, whether activation checkpointing was on, and a
digest of its weights before and after training. The tests read these to prove that two ranks trained together rather than one alone.
"""

import hashlib
import json
import os
import sys

import torch
from transformers import TrainerCallback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import run_speech_recognition_uot as script  # noqa: E402

# torch 2.13 defect, met only when ATEN_CPU_CAPABILITY forces a path below the CPU's own: on a CPU with AMX, bf16
# attention over 64 or more positions takes oneDNN's AMX packing, which then refuses to run outside the AVX-512
# kernels ("pack_vnni2 is only supported when avx512 is supported"). No CPU with AMX lacks AVX-512, so real machines
# never meet it; with oneDNN off, bf16 runs through ATen's own kernels of the forced path, which is what a rank on a
# machine without AVX-512 would run.
if torch.cpu._is_amx_tile_supported() and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
    torch.backends.mkldnn.enabled = False


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class RecordRank(TrainerCallback):
    def __init__(self, folder):
        self.folder = folder
        self.forwards = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world_size = torch.distributed.get_world_size() if distributed else 1
        self.initial = weights_digest(model)
        self.checkpointing = model.is_gradient_checkpointing
        model.register_forward_hook(self.record, with_kwargs=True)
        # Mixed precision wraps the model's forward method, inside the module call that runs hooks: a layer's hook
        # sees the autocast, the model's does not.
        model.lm_head.register_forward_hook(self.record_precision)

    def record_precision(self, module, args, output):
        self.head_dtype = str(output.dtype)

    def record(self, module, args, kwargs, output):
        if module.training:
            self.forwards.append({
                "labels": kwargs["labels"].tolist(),
                "input_lengths": "input_lengths" in kwargs,
                "attention_mask": "attention_mask" in kwargs,
                "transfer_ran": output.kt_loss is not None,
                "head_dtype": self.head_dtype,
            })

    def on_train_end(self, args, state, control, model=None, **kwargs):
        record = {
            "rank": self.rank, "world_size": self.world_size, "global_step": state.global_step,
            "activation_checkpointing": self.checkpointing, "forwards": self.forwards,
            "initial_weights": self.initial, "final_weights": weights_digest(model),
        }
        with open(os.path.join(self.folder, f"rank{self.rank}.json"), "w") as handle:
            json.dump(record, handle)


if __name__ == "__main__":
    record_dir, argv = sys.argv[1], sys.argv[2:]
    os.makedirs(record_dir, exist_ok=True)
    script.main(argv, callbacks=[RecordRank(record_dir)])
