"""Time and peak memory of our GradICON pieces against the reference (icon_registration 1.1.9), one process.

Figures (CPU, same inputs and weights for both):

* ``gradicon_loss_fwd_bwd_64``: the GradICON regulariser (Eq. 2) forward + backward on two random
  3D displacement fields, 1×3×64³, given in [0, 1] units to both (as our networks hand them over);
* ``gradicon_loss_ddf_input_fwd_bwd_64``: the same, ours fed MONAI DDFs in voxel units (the mix-in
  route, which pays for the unit conversion);
* ``knee_4step_forward_80x192x192``: the 4-step knee network (quarter/half/full/full U-Nets) forward at
  1×1×80×192×192 in eval mode, up to the dense map/DDF.

Each figure prints ``<figure>: ours=<value> reference=<value> ratio=<ours/reference>`` for seconds and
for peak memory (resident-set growth, MiB; Linux VmHWM reset through /proc/self/clear_refs, glibc's
mmap threshold fixed so freed tensors leave the resident set), then
``knee_4step_forward_flop_floor_ratio: ours=<s> reference=<floor s> ratio=<...>``: the floor is the
network's FLOPs (``torch.utils.flop_counter``) at this CPU's measured float32 matmul rate (2048² GEMM,
same threads), then a table, the load average, and the time of the forward's convolutions alone (profiled),
which bounds what the rest of the forward can gain.

    python scripts/benchmark_reference.py [--repeats 3] [--threads 2] [--quick]

About 2 minutes on an idle 2-core CPU (``--quick``: seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import icon_registration as icon  # noqa: E402
import icon_registration.network_wrappers as icon_wrappers  # noqa: E402
from reference_oracle import reference_loss, reference_network  # noqa: E402

from monai_gradicon.losses import GradICONLoss  # noqa: E402
from monai_gradicon.maps import Deformation  # noqa: E402
from monai_gradicon.networks import four_step_network, load_reference_weights  # noqa: E402


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_once(fn) -> tuple[float, float]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    start_rss = _rss_kib("VmRSS:")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, (_rss_kib("VmHWM:") - start_rss) / 1024


def measure(ours, reference, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (seconds, peak resident growth in MiB) of each, after a warm-up, calls interleaved so that
    load from other processes hits both alike."""
    ours()
    reference()
    samples = {"ours": [], "reference": []}
    for _ in range(repeats):
        samples["ours"].append(_measure_once(ours))
        samples["reference"].append(_measure_once(reference))
    return tuple(
        (statistics.median(s for s, _ in samples[k]), statistics.median(m for _, m in samples[k]))
        for k in ("ours", "reference")
    )


class _GivenDisplacement(torch.nn.Module):
    """A 'network' that returns a fixed displacement (to time the reference loss alone)."""

    def __init__(self, displacement):
        super().__init__()
        self.displacement = displacement

    def forward(self, image_A, image_B):
        return self.displacement


def bench_loss(size: int, repeats: int):
    shape = (size,) * 3
    g = torch.Generator().manual_seed(0)
    disp_AB = (torch.randn((1, 3, 8, 8, 8), generator=g) * 0.02)
    disp_AB = torch.nn.functional.interpolate(disp_AB, size=shape, mode="trilinear").requires_grad_(True)
    disp_BA = (-disp_AB.detach() * 0.9).requires_grad_(True)
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).reshape(1, 3, 1, 1, 1)

    ours = GradICONLoss(3)

    def run_ours():  # the same [0, 1]-unit displacements the reference gets (what our networks produce)
        disp_AB.grad = disp_BA.grad = None
        ours(Deformation([disp_AB]), Deformation([disp_BA])).backward()

    def run_ours_ddf():  # the mix-in route: MONAI DDFs in voxel units, converted inside the loss
        disp_AB.grad = disp_BA.grad = None
        ours(disp_AB * scale, disp_BA * scale).backward()

    ffvf_AB = icon_wrappers.FunctionFromVectorField(_GivenDisplacement(disp_AB))
    ffvf_BA = icon_wrappers.FunctionFromVectorField(_GivenDisplacement(disp_BA))
    model = icon.GradientICON(ffvf_AB, icon.SSD(), 0.2)
    model.assign_identity_map([1, 1, *shape])
    ffvf_BA.assign_identity_map([1, 1, *shape])
    image = torch.zeros((1, 1, *shape))

    def run_reference():
        disp_AB.grad = disp_BA.grad = None
        model.compute_gradient_icon_loss(ffvf_AB(image, image), ffvf_BA(image, image)).backward()

    # same value for the same noise (sanity check, not timed)
    torch.manual_seed(3)
    ref_value = model.compute_gradient_icon_loss(ffvf_AB(image, image), ffvf_BA(image, image))
    ours_value = GradICONLoss(3, generator=torch.Generator().manual_seed(3))(disp_AB * scale, disp_BA * scale)
    torch.testing.assert_close(ours_value, ref_value, rtol=1e-4, atol=0)
    return measure(run_ours, run_reference, repeats), measure(run_ours_ddf, run_reference, repeats)


def bench_network(shape, repeats: int):
    ref = reference_network(3, (2, 1, 0, 0))
    for p in ref.parameters():
        p.data.normal_(0, 0.01)
    model = reference_loss("sparse", ref, icon.LNCC(5), 1.5, (1, 1, *shape)).eval()
    ours = load_reference_weights(four_step_network(3), ref.state_dict()).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand((1, 1, *shape), generator=g), torch.rand((1, 1, *shape), generator=g)

    def run_ours():
        with torch.no_grad():
            return ours(a, b)

    def run_reference():
        with torch.no_grad():
            model.identity_map.isIdentity = True
            return model.regis_net(a, b)(model.identity_map)

    with torch.no_grad():  # same output (sanity check, not timed)
        reference_map = run_reference()
        ddf = run_ours()
        from monai_gradicon.maps import map_to_ddf

        torch.testing.assert_close(ddf, map_to_ddf(reference_map), rtol=1e-4, atol=1e-4)
    return measure(run_ours, run_reference, repeats)


def matmul_gflops(repeats: int = 5, n: int = 2048) -> float:
    """This CPU's float32 GEMM rate (GFLOP/s) at the current thread count: best of ``repeats``."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def forward_gflop(shape) -> float:
    """FLOPs (GFLOP) of one 4-step knee network forward at ``(1, 1, *shape)`` (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = four_step_network(3).eval()
    a = torch.rand((1, 1, *shape))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(a, a)
    return counter.get_total_flops() / 1e9


def forward_convolution_seconds(shape) -> float:
    """Seconds the convolutions (PyTorch's convolution kernels, self time) take in one profiled forward of ours."""
    from torch.profiler import profile

    net = four_step_network(3).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.01)
    a = torch.rand((1, 1, *shape))
    with torch.no_grad():
        net(a, a)
        with profile() as prof:
            net(a, a)
    kernels = ("aten::_convolution", "aten::mkldnn_convolution", "aten::slow_conv3d_forward", "aten::slow_conv_transpose3d")
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in kernels) / 1e6


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # Fixed mmap threshold: freed tensors go back to the OS, so resident-set growth tracks live memory.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loss_size, net_shape = (24, (65, 65, 65)) if args.quick else (64, (80, 192, 192))
    rows = []
    ((t_o, m_o), (t_r, m_r)), ((t_d, m_d), (t_r2, m_r2)) = bench_loss(loss_size, args.repeats)
    rows.append((f"gradicon_loss_fwd_bwd_{loss_size}", t_o, t_r, m_o, m_r))
    rows.append((f"gradicon_loss_ddf_input_fwd_bwd_{loss_size}", t_d, t_r2, m_d, m_r2))
    (t_o, m_o), (t_r, m_r) = bench_network(net_shape, args.repeats)
    rows.append((f"knee_4step_forward_{'x'.join(map(str, net_shape))}", t_o, t_r, m_o, m_r))
    for name, t_o, t_r, m_o, m_r in rows:
        print(f"{name}_seconds: ours={t_o:.4f} reference={t_r:.4f} ratio={t_o / t_r:.3f}")
        print(f"{name}_peak_mib: ours={m_o:.1f} reference={m_r:.1f} ratio={m_o / max(m_r, 1e-9):.3f}")
    gflop, rate = forward_gflop(net_shape), matmul_gflops()
    floor = gflop / rate
    forward_seconds = rows[-1][1]
    print(f"knee_4step_forward_flop_floor_ratio: ours={forward_seconds:.4f} reference={floor:.4f} ratio={forward_seconds / floor:.3f}")
    print()
    print(f"forward {gflop:.1f} GFLOP, float32 GEMM {rate:.1f} GFLOP/s -> floor {floor:.3f} s; load average {os.getloadavg()}")
    conv = forward_convolution_seconds(net_shape)
    print(f"the forward's convolutions alone (profiled, ours): {conv:.3f} s = {conv / floor:.2f}x the floor, {gflop / conv:.0f} GFLOP/s")
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} after a warm-up")
    print(f"{'figure':<40} {'ours s':>9} {'ref s':>9} {'time ratio':>10} {'ours MiB':>9} {'ref MiB':>9} {'mem ratio':>9}")
    for name, t_o, t_r, m_o, m_r in rows:
        print(f"{name:<40} {t_o:>9.3f} {t_r:>9.3f} {t_o / t_r:>10.3f} {m_o:>9.1f} {m_r:>9.1f} {m_o / max(m_r, 1e-9):>9.3f}")


if __name__ == "__main__":
    main()
