"""Speed and memory of one full registration, and the MLP's achieved GFLOP/s.

    python benchmarks/speed.py [--shape 256 256 96] [--threads 2] [--profile] [--compile MODE ...]

Registers a phantom CT -> CBCT pair with the package defaults and reports:
wall time and peak resident memory of the whole registration, iterations
per second of each stage, and the GFLOP/s of the velocity-network work
against a plain float32 matmul timed in the same run (the machine's
practical peak): per stage (network FLOPs over the whole iteration's time)
and for the network alone (the flow's forward and backward, timed by itself:
through the fused kernels of ``kernels/_siren.c``, then layer by layer with
the ``_sincos`` pass, the path of a CPU without AVX-512F, and with
``torch.sin`` and ``torch.cos``, the path of an install without either
extension).  Prints a Markdown table.
``--profile`` adds where the time of one training iteration of the network
goes (torch.profiler, self CPU time per operator) and the time of each kind
of pass one hidden layer makes (matmuls, sine, cosine, the fused
sine-cosine, a multiplication), which say why the MLP runs below the matmul.
``--compile`` times the network alone again through ``torch.compile`` in
each given mode (``default``, ``max-autotune-no-cudagraphs``, ...), beside
eager: the first call (tracing and compiling, or reading Inductor's on-disk
cache) and the steady state.
"""

import argparse
import resource
import time
from unittest import mock

import numpy as np
import torch

from nipype_inrlddmm import engine
from nipype_inrlddmm.kernels import sine, siren
from nipype_inrlddmm.phantom import make_pair


def mlp_flops_per_point_step(velocity: engine.VelocityField) -> float:
    """Forward FLOPs of one network evaluation at one point (2 per multiply-add)."""
    flops = sum(2.0 * m.in_features * m.out_features for m in velocity.modules() if isinstance(m, torch.nn.Linear))
    if velocity.frequencies is not None:
        flops += 2.0 * velocity.frequencies.numel()
    return flops


def median_seconds(run, *, blocks: int, calls: int = 1) -> float:
    """Median over ``blocks`` blocks of the mean seconds of ``calls`` calls of ``run``."""
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def matmul_gflops(size=2048, repeats=10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2.0 * size**3 / median_seconds(lambda: a @ b, blocks=1, calls=repeats) / 1e9


def network_step(config: engine.RegistrationConfig, points: int, compile_mode: str | None = None):
    """One training iteration's network work alone: the flow of ``points`` through the MLP, forward and backward.

    ``compile_mode`` runs the network through ``torch.compile`` in that mode (None: eager).
    """
    velocity = engine.VelocityField(torch.zeros(3), torch.full((3,), 100.0), config.model)
    torch.nn.init.normal_(velocity.output.weight, std=0.01)  # a trained field moves the points
    network = velocity if compile_mode is None else torch.compile(velocity, mode=compile_mode, dynamic=False)
    start = torch.randn(points, 3) * 50

    def step():
        displacement, kinetic = engine.integrate(network, start, config.model.n_steps)
        (displacement.square().mean() + kinetic).backward()

    return step


def network_seconds(config: engine.RegistrationConfig, points: int, repeats: int = 20,
                    compile_mode: str | None = None) -> tuple[float, float]:
    """Seconds of the first call of :func:`network_step` (compiling, if asked) and the median of the next."""
    step = network_step(config, points, compile_mode)
    first = median_seconds(step, blocks=1)
    return first, median_seconds(step, blocks=repeats)


def layer_passes(points: int, width: int) -> list[tuple[str, float, float | None]]:
    """``(pass, milliseconds, FLOPs or None)`` of each kind of pass a hidden layer makes over ``(points, width)``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(points, width, generator=generator) * 3
    weight = torch.randn(width, width, generator=generator)
    matmul = 2.0 * points * width * width
    passes = [("x @ W (forward)", lambda: x @ weight, matmul), ("x.T @ g (weight gradient)", lambda: x.T @ x, matmul),
              ("sin", lambda: torch.sin(x), None), ("cos", lambda: torch.cos(x), None),
              ("multiply", lambda: x * x, None)]
    if sine.COMPILED_SINCOS:
        overwritten = x.clone()  # the kernel writes the sine in place; its cost does not depend on the values
        passes.insert(4, ("sin and cos, fused (_sincos)", lambda: sine.sincos_(overwritten), None))
    rows = []
    for name, run, flops in passes:
        run()
        rows.append((name, 1e3 * median_seconds(run, blocks=5, calls=40), flops))
    return rows


def profile_iteration(config: engine.RegistrationConfig, points: int, repeats: int = 3) -> list[tuple[str, float]]:
    """Share of self CPU time per operator in forward + backward of the flow through the network."""
    from torch.profiler import ProfilerActivity, profile

    step = network_step(config, points)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = sorted(((e.key, e.self_cpu_time_total / total) for e in events), key=lambda kv: -kv[1])
    return shares[:8]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 96))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile one training iteration's operators")
    parser.add_argument("--compile", nargs="+", default=[], metavar="MODE",
                        help="also time the network alone through torch.compile in these modes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pair = make_pair(tuple(args.shape), seed=0)
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    config = engine.sized_config(engine.RegistrationConfig(), pair.cbct.shape, affine)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = engine.register_volumes(torch.tensor(pair.ct), affine, torch.tensor(pair.cbct), affine, config,
                                     fixed_mask=torch.tensor(pair.cbct_fov))
    wall = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_matmul = matmul_gflops()

    # The fine stage's automatic lattice stride follows its grid's voxel size (mm).
    fine_factors = engine.stage_factors(config.fine_factor, affine, "fine", pair.cbct.shape)
    spacing = np.linalg.norm(pair.affine[:3, :3], axis=0)
    fine_mm = (spacing * fine_factors).tolist()
    fine_points = config.fine.flow_points(pair.ct.shape, fine_mm)
    per_step = mlp_flops_per_point_step(result.velocity)
    n_steps = config.model.n_steps
    print(f"# INR-LDDMM speed, phantom {tuple(args.shape)}, {args.threads} threads, torch {torch.__version__}\n")
    print(f"- full registration (defaults): {wall:.1f} s wall, peak RSS {peak_gib:.2f} GiB "
          f"(before registering: {peak_before / 2**20:.2f} GiB)")
    print(f"- plain matmul 2048^2: {peak_matmul:.1f} GFLOP/s\n")
    print("| stage | iterations | seconds | it/s | points/it | MLP GFLOP/s | % of matmul |")
    print("|---|---|---|---|---|---|---|")
    for stage, stage_config in (("coarse", config.coarse), ("distill", config.distill), ("fine", config.fine)):
        log = [row for row in result.log if row["stage"] == stage]
        seconds = log[-1]["seconds"]
        if stage == "distill":
            points = stage_config.batch_points
        elif stage == "coarse":
            points = stage_config.flow_points(pair.ct.shape)
        else:
            points = fine_points
        # forward + backward ~ 3x the forward FLOPs
        gflops = 3.0 * per_step * n_steps * points * len(log) / seconds / 1e9
        print(f"| {stage} | {len(log)} | {seconds:.1f} | {len(log) / seconds:.2f} | {points} | {gflops:.1f} | "
              f"{100 * gflops / peak_matmul:.0f} % |")
    # The stage rate above divides by the whole iteration (image sampling and LNCC too); this is
    # the network's own work, timed alone on the fine stage's points per iteration.
    points = fine_points
    network_gflop = 3.0 * per_step * n_steps * points / 1e9
    paths = [("fused kernels (_siren)", True, True), ("layer by layer, _sincos", False, True),
             ("layer by layer, torch.sin and torch.cos", False, False)]
    print(f"\nnetwork alone (flow of {points} points, {n_steps} steps, forward + backward):\n")
    print("| path | ms | GFLOP/s | % of matmul |\n|---|---|---|---|")
    seconds = None  # of the first path this install has: the one it runs
    for name, fused_network, compiled_sincos in paths:
        if (fused_network and not siren.FUSED_NETWORK) or (compiled_sincos and not sine.COMPILED_SINCOS):
            print(f"| {name} | not in this install or on this CPU | | |")
            continue
        with (mock.patch.object(siren, "FUSED_NETWORK", fused_network),
              mock.patch.object(sine, "COMPILED_SINCOS", compiled_sincos)):
            _, path_seconds = network_seconds(config, points)
        seconds = path_seconds if seconds is None else seconds
        gflops = network_gflop / path_seconds
        print(f"| {name} | {1000 * path_seconds:.1f} | {gflops:.1f} | {100 * gflops / peak_matmul:.0f} % |")
    for mode in args.compile:
        first, compiled = network_seconds(config, points, compile_mode=mode)
        gflops = 3.0 * per_step * n_steps * points / compiled / 1e9
        print(f"- torch.compile(mode={mode!r}): first call {first:.1f} s, then {1000 * compiled:.1f} ms "
              f"({seconds / compiled:.2f} x eager), {gflops:.1f} GFLOP/s = {100 * gflops / peak_matmul:.0f} %")
    body = pair.cbct_labels > 0
    epe = np.linalg.norm((result.displacement.numpy() - pair.displacement) / spacing, axis=-1)[body].mean()
    print(f"\nmean end-point error inside the body: {epe:.2f} voxels")
    if args.profile:
        points = fine_points
        print(f"\nself CPU time of one training iteration ({points} points, {n_steps} steps), by operator:\n")
        print("| operator | share |\n|---|---|")
        for name, share in profile_iteration(config, points):
            print(f"| {name} | {100 * share:.0f} % |")
        width = config.model.width
        print(f"\none pass over the ({points}, {width}) activations of a hidden layer:\n")
        print("| pass | ms | GFLOP/s | % of matmul |\n|---|---|---|---|")
        for name, ms, flops in layer_passes(points, width):
            rate = None if flops is None else flops / ms / 1e6
            cells = "- | -" if rate is None else f"{rate:.1f} | {100 * rate / peak_matmul:.0f} %"
            print(f"| {name} | {ms:.2f} | {cells} |")


if __name__ == "__main__":
    main()
