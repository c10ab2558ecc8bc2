"""One optimiser step of Wav2Vec2ForCTCWithUOT against plain Wav2Vec2ForCTC with the same weights and batch.

    python benchmarks/bench_train_step.py                       # demo size on the CPU (hidden 144, 8 x 3 s)
    python benchmarks/bench_train_step.py --size base --device cuda --bf16   # wav2vec2-base + bert-base, 8 x 10 s

Both models are built from configs (random weights, nothing downloaded); the teacher is all-MiniLM-L6-v2 shaped
(demo size) or bert-base shaped (base size), also random. The variants are alternated step by step in one
process; medians of several steps each are printed with their ratio to plain CTC:

- `ctc`: plain Wav2Vec2ForCTC;
- `uot cached`: teacher states precomputed (what the script's on-disk cache gives);
- `uot on the fly`: the teacher encodes the transcripts inside every step;
- `uot blocking` (GPU only): as `uot cached`, with the solver's blocking iteration (`sync_free=False`), which
  reads every convergence check back on the host;
- `uot as before` (GPU only): the blocking iteration with autocast left on inside the solver, so that under `--bf16`
  its matrix products run in bfloat16: the solver as it was until 2026-11-26, for before/after figures;
- `uot uniform plan` (GPU only): the uniform plan `a b^T` in place of the solver, which leaves the transfer's cost
  outside the solver (adapter, cost, pooling, loss, diagnostics and their backward);
- `uot graphed` (GPU only): as `uot cached`, with `kt_cuda_graphs=True`: everything after the adapter replayed from
  captured CUDA graphs, the solver running `alignment_graph_iterations` iterations (`--graph-iterations`);

plus the solver's own time (measured in extra steps, with the device synchronised around every solver call, so
that it is the solver alone and not what the host could overlap) and the peak memory of each variant (GPU:
allocator peak; CPU: peak resident memory of a subprocess running only that variant).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2ForCTC

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modeling_uot_ctc.modeling_wav2vec2_uot as uot_modeling  # noqa: E402
import modeling_uot_ctc.solver as solver_module  # noqa: E402
from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTConfig, register_aligner, solve_uot  # noqa: E402
from modeling_uot_ctc.solver import UOTResult  # noqa: E402

SIZES = {
    # The demo model of configs/demo.yaml and a MiniLM-shaped teacher; 8 clips of 3 s.
    "demo": dict(
        encoder=dict(hidden_size=144, num_hidden_layers=4, num_attention_heads=4, intermediate_size=576,
                     conv_dim=[64, 64, 64, 64], conv_stride=[5, 4, 4, 4], conv_kernel=[10, 8, 4, 4], conv_bias=True,
                     feat_extract_norm="layer", num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4),
        teacher=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
        batch=8, seconds=3.0, labels=40, tokens=10,
    ),
    # wav2vec2-base and bert-base shapes; 8 clips of 10 s.
    "base": dict(
        encoder=dict(),  # Wav2Vec2Config's defaults are wav2vec2-base
        teacher=dict(),  # BertConfig's defaults are bert-base
        batch=8, seconds=10.0, labels=150, tokens=40,
    ),
    # A smoke-test size for any machine.
    "tiny": dict(
        encoder=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     conv_dim=[32, 32, 32], conv_stride=[5, 4, 4], conv_kernel=[10, 8, 8], conv_bias=True,
                     feat_extract_norm="layer", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
        teacher=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        batch=4, seconds=1.0, labels=10, tokens=5,
    ),
}


def build(size, device, seed=0):
    spec = SIZES[size]
    common = dict(vocab_size=32, pad_token_id=0, ctc_loss_reduction="mean", mask_time_prob=0.05, layerdrop=0.0)
    torch.manual_seed(seed)
    uot = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(
        **spec["encoder"], **common, teacher_hidden_size=BertConfig(**spec["teacher"]).hidden_size
    ))
    plain = Wav2Vec2ForCTC(Wav2Vec2Config(**spec["encoder"], **common))
    plain.load_state_dict(uot.state_dict(), strict=False)
    teacher = BertModel(BertConfig(**spec["teacher"])).eval().requires_grad_(False)
    for model in (uot, plain):
        model.freeze_feature_encoder()
    return uot.to(device).train(), plain.to(device).train(), teacher.to(device), spec


def make_batch(spec, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batch, samples = spec["batch"], int(spec["seconds"] * 16_000)
    lengths = torch.linspace(samples * 0.7, samples, batch).long()  # some padding, as in a real batch
    input_values = torch.randn(batch, samples, generator=gen)
    attention_mask = (torch.arange(samples)[None] < lengths[:, None]).long()
    input_values = input_values * attention_mask
    label_lengths = torch.linspace(spec["labels"] * 0.7, spec["labels"], batch).long()
    labels = torch.randint(1, 32, (batch, spec["labels"]), generator=gen)
    labels = labels.masked_fill(torch.arange(spec["labels"])[None] >= label_lengths[:, None], -100)
    token_lengths = torch.linspace(spec["tokens"] * 0.6, spec["tokens"], batch).long()
    token_ids = torch.randint(1000, 20000, (batch, spec["tokens"]), generator=gen) % 30000
    token_mask = (torch.arange(spec["tokens"])[None] < token_lengths[:, None]).long()
    out = dict(input_values=input_values, attention_mask=attention_mask, labels=labels)
    return {k: v.to(device) for k, v in out.items()}, token_ids.to(device), token_mask.to(device)


class Stopwatch:
    """Wall time of a code block, synchronising the GPU around it."""

    def __init__(self, device):
        self.device = device

    @contextlib.contextmanager
    def __call__(self, sink: list):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        sink.append(time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (as --bf16 in the Trainer)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps of each variant, alternated")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--alignment-tol", type=float, default=None, help="solver tolerance (default: the config's)")
    parser.add_argument("--alignment-max-iter", type=int, default=None, help="solver iterations at most")
    parser.add_argument("--graph-iterations", type=int, default=None,
                        help="solver iterations inside the graphs of 'uot graphed' (default: the config's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="also profile one 'uot cached' step: PREFIX.txt (operators by self CPU time) and "
                             "PREFIX.json (a Chrome trace)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT",
                        help="run only these variants ('ctc' is always run); quote names with spaces")
    parser.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    uot, plain, teacher, spec = build(args.size, device)
    if args.alignment_tol is not None:
        uot.config.alignment_tol = args.alignment_tol
    if args.alignment_max_iter is not None:
        uot.config.alignment_max_iter = args.alignment_max_iter
    if args.graph_iterations is not None:
        uot.config.alignment_graph_iterations = args.graph_iterations
    batch, token_ids, token_mask = make_batch(spec, device)
    with torch.no_grad():
        cached_states = teacher(input_ids=token_ids, attention_mask=token_mask).last_hidden_state
    register_aligner("uot-blocking", functools.partial(solve_uot, sync_free=False))
    register_aligner("uot-as-before", solver_as_before)
    register_aligner("uniform", uniform_plan)
    optimisers = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for m in (uot, plain)}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def step(name):
        model = plain if name == "ctc" else uot
        extra = {}
        if name in ALIGNER_OF or name == "uot graphed":  # the variants with cached teacher states
            extra = dict(teacher_hidden_states=cached_states, teacher_attention_mask=token_mask)
        elif name == "uot on the fly":
            with torch.no_grad(), autocast():
                states = teacher(input_ids=token_ids, attention_mask=token_mask).last_hidden_state
            extra = dict(teacher_hidden_states=states, teacher_attention_mask=token_mask)
        uot.config.aligner = ALIGNER_OF.get(name, "uot")
        uot.config.kt_cuda_graphs = name == "uot graphed"
        with autocast():
            loss = model(**batch, **extra).loss
        loss.backward()
        optimisers[model].step()
        optimisers[model].zero_grad(set_to_none=True)

    if args.only:
        variants = [args.only]
    else:
        variants = [v for v in VARIANTS if v not in GPU_ONLY or device.type == "cuda"]
        if args.variants:
            variants = [v for v in variants if v == "ctc" or v in args.variants]
    for name in variants:  # warm-up
        step(name)
    stopwatch = Stopwatch(device)
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name in variants:
            with stopwatch(times[name]):
                step(name)
    if args.only:
        if device.type == "cuda":
            print(torch.cuda.max_memory_allocated(device))
        else:
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return
    solver_times = time_solver(step, stopwatch, [v for v in variants if v in ALIGNER_OF], args.steps)

    medians = {name: statistics.median(t) for name, t in times.items()}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"size {args.size}: batch {spec['batch']} x {spec['seconds']} s, {spec['labels']} labels, "
          f"{spec['tokens']} teacher tokens; {card}; bf16 {args.bf16}; median of {args.steps} steps each; solver "
          f"tol {uot.config.alignment_tol}, max_iter {uot.config.alignment_max_iter}, "
          f"{uot.config.alignment_graph_iterations} iterations in the graphs")
    for name in variants:
        print(f"{name:>15}: {1e3 * medians[name]:9.1f} ms   ratio to ctc {medians[name] / medians['ctc']:.3f}")
    if "uot graphed" in variants:
        graphs = uot._transfer_graphs
        state = f"{len(graphs.graphs)} graph(s) captured and replayed" if not graphs.failed else "capture FAILED"
        print(f"uot graphed: {state}")
    for name, (solver, iterations) in solver_times.items():
        print(f"solver alone in '{name}' (device synchronised around it): {1e3 * solver:.1f} ms, "
              f"{solver / medians[name]:.1%} of that step's median, {iterations:.1f} iterations per example")

    if args.profile:
        profile_steps(step, "uot cached", args.profile, device)
    if args.no_memory:
        return
    print("peak memory:")
    for name in variants:
        print(f"{name:>15}: {peak_memory(name, args, device) / 2**20:9.0f} MiB")


VARIANTS = [
    "ctc", "uot cached", "uot blocking", "uot as before", "uot uniform plan", "uot graphed", "uot on the fly"
]
GPU_ONLY = {"uot blocking", "uot as before", "uot uniform plan", "uot graphed"}
# The aligner each variant with cached teacher states uses.
ALIGNER_OF = {
    "uot cached": "uot", "uot blocking": "uot-blocking", "uot as before": "uot-as-before",
    "uot uniform plan": "uniform",
}


def solver_as_before(*args, **kwargs):
    """The blocking solver without its autocast guard, as it was until 2026-11-26 (bf16 products under --bf16)."""
    guard = solver_module._autocast_disabled
    solver_module._autocast_disabled = lambda device: contextlib.nullcontext()
    try:
        return solve_uot(*args, sync_free=False, **kwargs)
    finally:
        solver_module._autocast_disabled = guard


def uniform_plan(cost, frame_mask, token_mask, *args, **kwargs):
    """An aligner that does no work: every valid frame sends its share to every valid token (`a b^T`)."""
    a = frame_mask.float() / frame_mask.sum(-1, keepdim=True).clamp_min(1)
    b = token_mask.float() / token_mask.sum(-1, keepdim=True).clamp_min(1)
    plan = a[:, :, None] * b[:, None, :]
    zeros = torch.zeros(cost.shape[0], device=cost.device)
    return UOTResult(plan, (cost * plan).sum((1, 2)), a, b, zeros.long(), zeros.bool(), zeros)


def time_solver(step, stopwatch, variants, steps):
    """Median time and mean iterations of the solver call inside `steps` further steps of each variant.

    The device is synchronised around each call.

    Kept apart from the timed steps: the synchronisation it needs would take away the overlap of the solver's
    launches with the encoder's work that the sync-free iteration is there to allow.
    """
    medians = {}
    for name in variants:
        aligner_name = ALIGNER_OF[name]
        real_solver = uot_modeling.ALIGNERS[aligner_name]
        samples, iterations = [], []

        def timed_solver(*a, **k):
            with stopwatch(samples):
                result = real_solver(*a, **k)
            iterations.append(float(result.n_iter.float().mean()))
            return result

        uot_modeling.ALIGNERS[aligner_name] = timed_solver
        try:
            for _ in range(steps):
                step(name)
        finally:
            uot_modeling.ALIGNERS[aligner_name] = real_solver
        medians[name] = statistics.median(samples), statistics.mean(iterations)
    return medians


def profile_steps(step, name, prefix, device, steps=1):
    """Profile `steps` steps of one variant; write the operator table and a Chrome trace next to `prefix`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(name)
        if device.type == "cuda":
            torch.cuda.synchronize()
    with open(f"{prefix}.txt", "w") as handle:
        handle.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60))
    prof.export_chrome_trace(f"{prefix}.json")
    print(f"profile of {steps} '{name}' steps: {prefix}.txt, {prefix}.json")


def peak_memory(name, args, device):
    """Peak memory of one variant alone, measured in a fresh process (so that the peaks stay apart): the
    allocator's peak on a GPU, the resident peak on a CPU (which includes the interpreter and libraries)."""
    command = [sys.executable, __file__, "--size", args.size, "--device", args.device, "--steps", "1", "--only", name]
    out = subprocess.run(command + (["--bf16"] if args.bf16 else []), capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


if __name__ == "__main__":
    main()
