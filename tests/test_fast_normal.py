"""csrc/normal.cpp (`noisy_gate.randn_like`, the noisy router's noise draw): torch.randn bit for bit, and the
generator left exactly as torch.randn leaves it, for every size around the mt19937 state's 624 words and the
Box-Muller blocks of 16, after draws that leave the state part used, with the default and with an explicit generator;
and for each CPU capability PyTorch dispatches its normal kernel at (its AVX2 and its scalar code), each built and
run in a subprocess with ATEN_CPU_CAPABILITY set."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_lens.moe import noisy_gate
from moe_lens.moe.cpu_runtime import cpu_extension

SHAPES = [(16,), (17,), (31,), (623,), (624,), (625,), (1249,), (100, 3), (3, 1000, 7), (512, 64)]
PRE = [0, 1, 5, 623, 624, 1000]  # uniforms drawn before: the engine's state part used (or just regenerated)

CHECK = textwrap.dedent("""
    import sys, torch
    fill = {fill}
    bad = []
    for seed in (0, 7):
        for shape in {shapes}:
            for pre in {pre}:
                torch.manual_seed(seed)
                if pre:
                    torch.rand(pre)
                want, after_want = torch.randn(shape), torch.rand(700)
                torch.manual_seed(seed)
                if pre:
                    torch.rand(pre)
                got = torch.empty(shape)
                fill(got, None)
                if not (torch.equal(got, want) and torch.equal(torch.rand(700), after_want)):
                    bad.append((seed, shape, pre))
    g, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want, got = torch.randn(1001, generator=g), torch.empty(1001)
    fill(got, g2)
    if not (torch.equal(got, want) and torch.equal(torch.rand(9, generator=g), torch.rand(9, generator=g2))):
        bad.append("explicit generator")
    print(f"BAD {{bad}}" if bad else "OK " + torch.backends.cpu.get_cpu_capability())
""")


def _need_kernel():
    ext = cpu_extension()
    if ext is None or not hasattr(ext, "randn_fill"):
        if os.environ.get("CI") == "true":
            pytest.fail("the compiled CPU kernel did not build")
        pytest.skip("no compiled CPU kernel here")
    return ext


def test_randn_fill_is_torch_randn_bit_for_bit() -> None:
    ext = _need_kernel()
    scope = {"fill": ext.randn_fill, "torch": torch}
    out: list[str] = []
    code = CHECK.format(fill="fill", shapes=SHAPES, pre=PRE).replace("print(", "out.append(")
    exec(compile(code, "check", "exec"), {**scope, "out": out})
    assert out[0].startswith("OK"), out


def test_randn_like_is_torch_randn_like_and_falls_back() -> None:
    _need_kernel()
    clean = torch.randn(300, 16)[:, :8]  # the router's strided view: randn_like's result is contiguous either way
    torch.manual_seed(5)
    want = torch.randn_like(clean)
    torch.manual_seed(5)
    got = noisy_gate.randn_like(clean)
    assert torch.equal(got, want) and got.is_contiguous()
    for t in (torch.zeros(15), torch.zeros(40, dtype=torch.float64)):  # too small, float64: torch.randn_like itself
        torch.manual_seed(5)
        want = torch.randn_like(t)
        torch.manual_seed(5)
        assert torch.equal(noisy_gate.randn_like(t), want)


@pytest.mark.slow
@pytest.mark.parametrize("cap", ["AVX2", "DEFAULT"])
def test_randn_fill_matches_torch_at_each_capability(cap: str, tmp_path) -> None:
    """normal.cpp alone, built with the flags of capability `cap` (cpu_runtime.capability_flags) and run where
    PyTorch's dispatch runs at `cap`: its AVX2 kernel (avx_mathfun's log and sincos; AVX-512 runs it too) or its scalar
    code (libm's logf, cosf and sinf). About 25 s each to compile."""
    _need_kernel()
    native = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX2" and native not in ("AVX2", "AVX512"):
        if os.environ.get("CI") == "true":  # the CI machine runs PyTorch at AVX-512: this check must run there
            pytest.fail(f"CI runs PyTorch at {native}, below AVX2: the AVX2 build was not checked")
        pytest.skip(f"this CPU runs PyTorch at {native}, below AVX2")
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from torch.utils import cpp_extension
        from moe_lens.moe.cpu_runtime import CPU_EXT_SOURCE, capability_flags
        assert torch.backends.cpu.get_cpu_capability() == {cap!r}, torch.backends.cpu.get_cpu_capability()
        src = os.path.join(os.path.dirname(CPU_EXT_SOURCE), "normal.cpp")
        ext = cpp_extension.load("moe_lens_normal_{cap.lower()}", [src], build_directory={str(tmp_path)!r},
                                 extra_cflags=capability_flags({cap!r}) + ["-DMOE_LENS_NORMAL_ONLY"])
    """) + CHECK.format(fill="ext.randn_fill", shapes=SHAPES, pre=PRE))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap.lower()}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"OK {cap}", out.stdout[-2000:]
