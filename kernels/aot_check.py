"""Compile every Triton kernel variant for a CUDA target without a GPU (ahead of time).

The CPU interpreter runs kernels with numpy and accepts things the real compiler rejects;
this catches those on machines without a GPU:

    python -m fastmoe_adv.kernels.aot_check [gated_mix|pgd_step|batchnorm ...] [--arch 90]

Must run with TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted).
Exit status: 0 all compiled, 1 a kernel failed, 77 this triton cannot compile for CUDA here.
"""
import argparse
import itertools
import os
import sys

SKIP = 77
OPS = ("gated_mix", "pgd_step", "batchnorm")
_DATA_PTRS = ("z_ptr", "x_ptr", "xn_ptr")  # the argument whose dtype names a variant's data dtype

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

    out = {"gated_mix": [], "pgd_step": [], "batchnorm": _batchnorm_variants(quick)}
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


def _bn_layouts(quick: bool):
    """(layout name, x on the meta device) for the activation shapes the launchers see."""
    import torch

    shapes = ((128, 9 * 64, 32, 32),) if quick else ((128, 9 * 64, 32, 32), (128, 9 * 512, 4, 4), (3, 5, 5, 5))
    for shape in shapes:
        x = torch.empty(shape, device="meta")
        yield "nchw", x
        yield "cl", x.to(memory_format=torch.channels_last)


def _batchnorm_variants(quick: bool):
    """Every batchnorm kernel variant. Triton specializes integer arguments equal to 1 as
    constants (the unit stride; Q = 1 in channels_last): those are constexprs here too."""
    import importlib

    bn = importlib.import_module(f"{__package__}.batchnorm")
    out = []
    ints = ("P", "C", "Q", "sP", "sC", "sQ")
    for dt in ("fp32", "bf16", "fp16"):
        for layout, x in _bn_layouts(quick):
            view = bn._View(x)
            bp, bc, bq, nw = bn._config(view, interpreter=False)
            blocks = dict(BLOCK_P=bp, BLOCK_C=bc, BLOCK_Q=bq)
            values = dict(zip(ints, (*view.sizes(), *view.strides)))
            ones = {k: 1 for k, v in values.items() if v == 1}
            geo = {k: "i32" for k in ints if k not in ones}

            def sig(data, fp32=(), **extra):
                return {**{k: f"*{dt}" for k in data}, **{k: "*fp32" for k in fp32}, **extra}

            s = sig(("x_ptr",), ("part_ptr",), **geo, p_per_split="i32", SPLIT="i32")
            out.append((bn._bn_stats_partial_kernel, s, {**blocks, **ones}, nw))
            final = dict(BLOCK_S=bn._FINAL_BLOCK_S, BLOCK_C=bn._FINAL_BLOCK_C)
            for update in (True,) if quick else (False, True):
                s = sig(("x_ptr",), ("part_ptr", "mean_ptr", "rstd_ptr", "rm_ptr", "rv_ptr"), C="i32", SPLIT="i32",
                        inv_count="fp32", unbias="fp32", eps="fp32", momentum="fp32")
                s.update({} if "sC" in ones else {"sC": "i32"})
                consts = dict(UPDATE_RUNNING=update, **final, **{k: 1 for k in ("sC",) if k in ones})
                out.append((bn._bn_stats_finalize_kernel, s, consts, 4))
            # quick: every constexpr branch compiled at least once (all off, all on)
            flags = ((False,) * 3, (True,) * 3) if quick else itertools.product((False, True), repeat=3)
            for has_res, relu, ev in flags:
                s = sig(("x_ptr", "res_ptr", "y_ptr"), ("w_ptr", "b_ptr", "mean_ptr", "var_ptr"), eps="fp32", **geo)
                consts = dict(HAS_RES=has_res, RELU=relu, EVAL=ev, **blocks, **ones)
                out.append((bn._bn_apply_kernel, s, consts, nw))
            flags = ((False,) * 3, (True,) * 3) if quick else [
                (relu, relu and store, ev) for relu in (False, True) for store in (False, True)[:1 + relu]
                for ev in (False, True)]
            for relu, store_dres, ev in flags:
                s = sig(("dy_ptr", "y_ptr", "x_ptr", "dres_ptr", "dx_ptr"),
                        ("w_ptr", "mean_ptr", "var_ptr", "part_ptr"), eps="fp32", **geo, p_per_split="i32", SPLIT="i32")
                consts = dict(RELU=relu, STORE_DRES=store_dres, EVAL=ev, **blocks, **ones)
                out.append((bn._bn_bwd_reduce_kernel, s, consts, nw))
            for relu in (False, True):
                s = sig(("dy_ptr", "y_ptr", "x_ptr", "dx_ptr"), ("w_ptr", "mean_ptr", "rstd_ptr", "sums_ptr"),
                        inv_count="fp32", **geo)
                out.append((bn._bn_bwd_dx_kernel, s, dict(RELU=relu, **blocks, **ones), nw))
    s = {"part_ptr": "*fp32", "sums_ptr": "*fp32", "C": "i32", "SPLIT": "i32"}  # fp32 only: one variant
    out.append((bn._bn_bwd_finalize_kernel, s, dict(BLOCK_S=bn._FINAL_BLOCK_S, BLOCK_C=bn._FINAL_BLOCK_C), 4))
    return out


def _data_dtype(sig):
    """The variant's data dtype ("fp32", "bf16", ...), or None for a kernel on fp32 buffers only."""
    for k in _DATA_PTRS:
        if k in sig:
            return sig[k].lstrip("*")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", default=list(OPS), help=f"any of {', '.join(OPS)} (default all)")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,fp64", help="comma list of data dtypes to compile")
    parser.add_argument("--quick", action="store_true", help="one block configuration per kernel (for tests)")
    args = parser.parse_args(argv)
    unknown = [op for op in args.ops if op not in OPS]
    if unknown:  # not argparse choices: a nargs="*" default list trips them on Python 3.11
        parser.error(f"unknown ops {unknown}, expected any of {OPS}")
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
            data = _data_dtype(sig)
            if data is not None and data not in dtypes:
                continue
            try:
                triton.compile(ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                                         constexprs=consts), target=target, options={"num_warps": num_warps})
            except Exception as exc:  # report every failing variant, not just the first
                failed += 1
                print(f"FAILED {fn.__name__} {data} {consts}: {exc}")
    print(f"aot_check: {'failed' if failed else 'ok'} ({failed} failures) for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
