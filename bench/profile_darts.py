"""Where a DARTS relaxation's search step spends its time: s/step, then torch.profiler's top ops.

Relaxes a model as the ``darts`` pass does (channels-last, first order, batch 64, random 32x32
inputs made before timing), times ``--steps`` search steps (an α step and a weight step) after
one warm-up, then profiles one more step. The figures that led to the relaxation's defaults:

    python bench/profile_darts.py user:mobilenetv2                   # today's default candidates
    python bench/profile_darts.py user:mobilenetv2 --ops none,max_pool_3x3,avg_pool_3x3,skip_connect,sep_conv_3x3,sep_conv_5x5,dil_conv_3x3,dil_conv_5x5 --kinds depthwise,pointwise,dense,other

It uses only ``relax(ir, pattern, ops, generator=...)`` and the search's step functions, so it
also runs on a checkout from before ``darts.kinds`` existed (leave out ``--kinds`` there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="builtin:NAME or user:mobilenetv2 (examples/mobilenetv2_user.py)")
    parser.add_argument("--ops", default=None, help="comma-separated candidates (default: relax()'s)")
    parser.add_argument("--kinds", default=None, help="comma-separated node kinds (default: relax()'s)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15, help="profiler rows to print (0: no profile)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from fxsculpt.ir.graph import IR
    from fxsculpt.ir.load import LoadOptions, load_ir
    from fxsculpt.nas.darts.relax import relax
    from fxsculpt.nas.darts.search import SearchSettings, make_optimizers, weight_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "user:mobilenetv2":
        from examples.mobilenetv2_user import UserMobileNetV2

        ir = IR.from_module(UserMobileNetV2().eval(), (1, 3, 32, 32), 10)
    else:
        ir = load_ir(args.model, LoadOptions(input_shape=(1, 3, 32, 32), num_classes=10))
    macs = ir.mac_count()
    extra = {"kinds": args.kinds.split(",")} if args.kinds else {}
    positional = [args.ops.split(",")] if args.ops else []
    relaxed = relax(ir, "conv", *positional, generator=torch.Generator().manual_seed(0), **extra)
    print(
        f"relaxed {len(relaxed)} nodes, {sum(map(len, relaxed.values()))} candidates, MACs x{ir.mac_count() / macs:.2f}"
    )
    alphas = list({id(a): a for a in ir.arch_parameters()}.values())
    arch = {id(a) for a in alphas}
    weights = [p for p in ir.gm.parameters() if id(p) not in arch]
    model = ir.gm.to(memory_format=torch.channels_last).train()
    settings = SearchSettings()
    optimizer, architect = make_optimizers(model, weights, alphas, settings)
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(64, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
        for _ in range(args.steps + 3)
    ]
    ys = [torch.randint(0, 10, (64,), generator=g) for _ in xs]

    def step(i: int) -> None:
        architect.step(xs[i], ys[i], xs[i + 1], ys[i + 1], xi=settings.w_lr)
        weight_step(model, optimizer, weights, alphas, xs[i], ys[i], settings.grad_clip)

    step(0)
    times = []
    for i in range(1, args.steps + 1):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    print("s/step:", " ".join(f"{t:.2f}" for t in times))
    if args.rows:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(args.steps + 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
