"""Compile every Triton kernel variant for a CUDA target without a GPU (ahead of time).

The CPU interpreter runs kernels with numpy and accepts things the real compiler rejects;
this catches those on machines without a GPU:

    python -m fastmoe_adv.kernels.aot_check [gated_mix|pgd_step ...] [--arch 90]

Must run with TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted).
Exit status: 0 all compiled, 1 a kernel failed, 77 this triton cannot compile for CUDA here.
"""
import argparse
import os
import sys

SKIP = 77

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_kernel(p):  # p: one fp32
        tl.store(p, tl.load(p) + 1.0)
except Exception:  # handled in main()
    pass


def _variants(quick: bool):
    """(kernel, signature, constexprs, num_warps) for each variant the launchers can produce."""
    import importlib

    import triton.language as tl

    # importlib: the package attributes gated_mix / pgd_step are the functions, not the modules
    gm = importlib.import_module(f"{__package__}.gated_mix")
    pg = importlib.import_module(f"{__package__}.pgd_step")

    out = {"gated_mix": [], "pgd_step": []}
    for dt, acc in (("fp32", tl.float32), ("bf16", tl.float32), ("fp16", tl.float32), ("fp64", tl.float64)):
        for B, E, K in ((8192, 9, 10),) if quick else ((8192, 9, 10), (2, 64, 1024), (1, 1, 10)):
            bb, be, bk, nw = gm._gated_mix_config(B, E, K)
            blocks = {"BLOCK_B": bb, "BLOCK_E": be, "BLOCK_K": bk}
            for mode in (0, 1):
                sig = {n: f"*{dt}" for n in ("z_ptr", "g_ptr", "out_ptr", "w_ptr")}
                sig.update(B="i32", E="i32", K="i32", inv_temp="fp32")
                consts = dict(MODE=mode, ACC=acc, **blocks)
                out["gated_mix"].append((gm._gated_mix_fwd_kernel, sig, consts, nw))
                for has_dw in (False, True):
                    sig = {n: f"*{dt}" for n in ("z_ptr", "g_ptr", "dy_ptr", "dw_ptr", "dz_ptr", "dg_ptr")}
                    sig.update(B="i32", E="i32", K="i32", inv_temp="fp32")
                    consts = dict(MODE=mode, HAS_DW=has_dw, ACC=acc, **blocks)
                    out["gated_mix"].append((gm._gated_mix_bwd_kernel, sig, consts, nw))
    for dt in ("fp32", "bf16", "fp16"):
        for n in (512 * 9 * 3 * 32 * 32,) if quick else (1000, 512 * 9 * 3 * 32 * 32):
            block, nw = pg._elementwise_config(n)
            for a_group, e_group in ((False, False), (True, False), (False, True), (True, True)):
                sig = {k: f"*{dt}" for k in ("x_ptr", "g_ptr", "xn_ptr", "out_ptr")}
                sig.update(alpha_ptr="*fp32", eps_ptr="*fp32", alpha="fp32", eps="fp32", alpha_inner="i32",
                           eps_inner="i32", lo="fp32", hi="fp32", N="i32")
                consts = dict(ALPHA_PER_GROUP=a_group, EPS_PER_GROUP=e_group, BLOCK=block)
                out["pgd_step"].append((pg._pgd_step_kernel, sig, consts, nw))
            for e_group in (False, True):
                sig = dict(xn_ptr=f"*{dt}", u_ptr="*fp32", out_ptr=f"*{dt}", eps_ptr="*fp32", eps="fp32",
                           eps_inner="i32", lo="fp32", hi="fp32", N="i32")
                consts = dict(EPS_PER_GROUP=e_group, BLOCK=block)
                out["pgd_step"].append((pg._pgd_random_start_kernel, sig, consts, nw))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", default=["gated_mix", "pgd_step"])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,fp64", help="comma list of data dtypes to compile")
    parser.add_argument("--quick", action="store_true", help="one block configuration per kernel (for tests)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_check: unset TRITON_INTERPRET (kernels are interpreted, nothing to compile)")
        return SKIP
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as exc:  # no triton, or an API this check does not know
        print(f"aot_check: cannot compile here: {exc!r}")
        return SKIP
    dtypes = set(args.dtypes.split(","))
    target = GPUTarget("cuda", args.arch, 32)
    try:  # can this install compile for CUDA at all (nvidia backend, ptxas)?
        triton.compile(ASTSource(fn=_probe_kernel, signature={"p": "*fp32"}, constexprs={}), target=target)
    except Exception as exc:
        print(f"aot_check: this triton cannot compile for sm_{args.arch} here: {exc!r}")
        return SKIP
    variants = _variants(args.quick)
    failed = 0
    for op in args.ops:
        for fn, sig, consts, num_warps in variants[op]:
            if not any(v == f"*{d}" for d in dtypes for k, v in sig.items() if k in ("z_ptr", "x_ptr", "xn_ptr")):
                continue
            try:
                triton.compile(ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                                         constexprs=consts), target=target, options={"num_warps": num_warps})
            except Exception as exc:  # report every failing variant, not just the first
                failed += 1
                print(f"FAILED {fn.__name__} {sig.get('z_ptr', sig.get('x_ptr', sig.get('xn_ptr')))} {consts}: {exc}")
    print(f"aot_check: {'failed' if failed else 'ok'} ({failed} failures) for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
